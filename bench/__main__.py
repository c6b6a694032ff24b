"""``python -m bench [--quick | --smoke]``: memory, speed and quality per backend and scheme,
diffquant and diffusers side by side on the same checkpoint. See bench/README.md.

Each (library, scheme) pair runs in its own child process (``bench.worker``), one at a time,
so peak memory is that load's alone and timings do not compete. ``--smoke`` runs the same code
in this process on a toy model (seconds; its memory numbers are not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import model as bm
from bench import tables as bt
from bench.runner import Runner
from bench.schemes import (LOAD_ONLY_GGUF, config_of, diffusers_gap, enumerate_schemes,
                           ideal_bits)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller model and fewer tokens (minutes)")
    mode.add_argument("--smoke", action="store_true", help="toy model, in-process (seconds; tests)")
    p.add_argument("--only", default=None, help="run only schemes whose label contains this text")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per measurement (default 2; 1 with --smoke)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers column")
    p.add_argument("--no-images", action="store_true", help="skip the shipped-pipeline table")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--timeout", type=int, default=None, help="seconds per child (default by size)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan_jobs(schemes, size, ckpt: Path, threads: int, with_diffusers: bool, outdir: Path):
    """(scheme, lib, job or {"na": reason}) in run order; diffquant first (it writes the .gguf)."""
    gguf_dir = ckpt.parent / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    for i, s in enumerate(schemes):
        base = dict(label=s.label, scheme=vars(s), size=size.name, checkpoint=str(ckpt),
                    dtype=s.dtype, threads=threads)
        config = config_of(s) if s.quantized else None
        gguf = gguf_dir / f"{getattr(config, 'quant_type', '')}.gguf" if s.backend == "gguf" else None
        job = dict(base, lib="diffquant", outputs=str(outdir / f"{i}-diffquant.pt"))
        if gguf is not None and not gguf.is_file():
            job["export_gguf"] = str(gguf)
        yield s, "diffquant", job
        if not with_diffusers:
            continue
        gap = diffusers_gap(config) if config is not None else None
        if gap:
            yield s, "diffusers", {"na": gap}
            continue
        job = dict(base, lib="diffusers", outputs=str(outdir / f"{i}-diffusers.pt"))
        if gguf is not None:
            job["gguf_source"] = str(gguf)
        yield s, "diffusers", job


def describe(res: dict) -> str:
    if "na" in res:
        return res["na"]
    if "error" in res and "load_s" not in res:
        return res["error"]
    steps = ", ".join(f"{v:.2f}" for v in (res.get("step_s") or {}).values())
    extra = f" [{res['error']}]" if "error" in res else ""
    return f"load {res['load_s']:.1f} s, peak-base {(res['peak'] - res['baseline']) / 2**30:.2f} GiB, " \
           f"step s [{steps}]{extra}"


def measure(args, size, ckpt: Path, schemes, workdir: Path):
    runner = Runner(args.smoke, args.timeout or {"full": 3600, "quick": 600}.get(size.name, 300),
                    workdir)
    results, outputs = {}, {}
    jobs = list(plan_jobs(schemes, size, ckpt, args.threads, not args.no_diffusers, workdir))
    for i, (s, lib, job) in enumerate(jobs, 1):
        if "na" in job:
            results[(s.label, lib)] = job
            continue
        if job.get("gguf_source") and not Path(job["gguf_source"]).is_file():
            dq = results.get((s.label, "diffquant"), {})
            results[(s.label, lib)] = {"na": "n/a (no .gguf: diffquant's export failed: "
                                             f"{dq.get('error', 'unknown')})"}
            continue
        bm.warm_page_cache(ckpt)
        start = time.perf_counter()
        res = runner.run(job)
        results[(s.label, lib)] = res
        if Path(job["outputs"]).is_file():
            outputs[(s.label, lib)] = torch.load(job["outputs"])
        log(f"[{i}/{len(jobs)}] {lib:9} {s.label}: {describe(res)} "
            f"({time.perf_counter() - start:.0f} s)")
    return results, outputs


def linear_shapes(size) -> list[tuple[int, int]]:
    meta = bm._meta_model(size)
    return [(m.in_features, m.out_features) for m in meta.modules() if isinstance(m, torch.nn.Linear)]


def ideal_table(schemes, size) -> dict:
    """label -> (ideal bits per weight over this model's linear layers, formula)."""
    shapes = linear_shapes(size)
    weights = sum(i * o for i, o in shapes)
    out = {}
    for s in schemes:
        if not s.quantized:
            out[s.label] = (16.0 if s.dtype == "bfloat16" else 32.0, s.dtype)
            continue
        config = config_of(s)
        per_layer = [(ideal_bits(config, i), i * o) for i, o in shapes]
        if any(b is None for (b, _), _ in per_layer):
            out[s.label] = (None, "?")
            continue
        out[s.label] = (sum(b * w for (b, _), w in per_layer) / weights, _formula(config, shapes))
    return out


def _formula(config, shapes) -> str:
    """The formula for the most common in_features (row-scale formats depend on it)."""
    counts: dict[int, int] = {}
    for i, o in shapes:
        counts[i] = counts.get(i, 0) + i * o
    return ideal_bits(config, max(counts, key=counts.get))[1]


def load_only_rows() -> list:
    from diffquant.ops.formats.gguf import BLOCK_LAYOUT, ggml_type

    rows = []
    for name in LOAD_ONLY_GGUF:
        block, nbytes = BLOCK_LAYOUT[ggml_type(name)]
        rows.append((name, 8 * nbytes / block, f"8*{nbytes}/{block}"))
    return rows


def render(args, size, ckpt, schemes, results, outputs, images_section: str) -> str:
    machine = bt.machine_line(args.threads)
    params = bm.parameter_count(ckpt)
    cfg = size.transformer_config
    model_line = (f"Checkpoint: Flux-configuration transformer, width {size.width}, "
                  f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks, "
                  f"{params / 1e6:.1f}M parameters, random weights, bf16 "
                  f"({params * 2 / 2**30:.2f} GiB); `{ckpt.relative_to(Path.cwd()) if ckpt.is_relative_to(Path.cwd()) else ckpt}`.")
    ideals = ideal_table(schemes, size)
    bf16 = schemes[0].label
    reference = outputs.get(("float32 (unquantized)", "diffquant"))
    parts = [f"## Benchmark ({size.name})", model_line + (" In-process smoke run: memory numbers "
                                                          "are not meaningful." if args.smoke else "")]
    parts.append(bt.section("bits", machine, bt.md_table(
        bt.BITS_HEADER, bt.bits_rows(schemes, results, ideals, params, load_only_rows())),
        "Linear bits/weight: bytes held by every linear layer except its bias, × 8, over its "
        "in × out weights (layers a backend leaves unquantized count too). Model bytes/param: "
        "all bytes the loaded model holds over the checkpoint's parameter count."))
    parts.append(bt.section("memory", machine, bt.md_table(bt.MEMORY_HEADER, bt.memory_rows(schemes, results)),
                            "Each load in its own child process; baseline = that child's peak RSS "
                            "(ru_maxrss) after importing torch, the library and the backend's "
                            "package; load peak = after from_pretrained; × model: (load peak − "
                            "baseline) ÷ the loaded model's bytes; anon. peak: the same with "
                            "anonymous memory only (RssAnon sampled every 2 ms: what the loader "
                            "allocated, without the checkpoint pages it mapped); after a step: peak − baseline "
                            "once table 4's forwards ran (activations included; a loader that "
                            "maps the file without reading it, as diffusers does for a bf16 "
                            "checkpoint loaded in bf16, shows its weights only here). GGUF on the "
                            "diffusers side loads a .gguf written by diffquant's export_gguf "
                            "(diffusers cannot quantize GGUF on load)."))
    parts.append(bt.section("load", machine, bt.md_table(bt.LOAD_HEADER, bt.load_rows(schemes, results)),
                            "Checkpoint read once before each load so the page cache is warm."))
    parts.append(bt.section("speed", machine, bt.md_table(
        bt.speed_header(size.image_tokens), bt.speed_rows(schemes, results, size.image_tokens, bf16)),
        f"One transformer forward, batch 1, {size.text_tokens} text tokens, {args.threads} threads; "
        f"minimum of {size.repeats} after a warm-up. Ratios are to the same library's bf16 row "
        "measured in this run."))
    parts.append(bt.section("quality", machine, bt.md_table(
        bt.QUALITY_HEADER, bt.quality_rows(schemes, results, outputs, reference)),
        "Outputs at every token count of table 4 against diffquant's float32 unquantized output: "
        "relative L2 error and PSNR with peak = the reference's range. Random weights have no "
        "outliers, so real checkpoints can fare worse; table 6 uses trained weights."))
    parts.append(images_section)
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    size = bm.SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.threads is None:
        args.threads = 1 if args.smoke else 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ckpt = bm.ensure_checkpoint(size, log=log)
    schemes = enumerate_schemes(args.only)
    log(f"bench {size.name}: {len(schemes)} schemes × {1 if args.no_diffusers else 2} libraries")
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-") as tmp:
        results, outputs = measure(args, size, ckpt, schemes, Path(tmp))
    from bench.images import images_section

    machine = bt.machine_line(args.threads)
    images = images_section(args, schemes, machine, log) if not args.no_images else \
        bt.section("images", machine, "", "Skipped (--no-images).")
    text = render(args, size, ckpt, schemes, results, outputs, images)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[1]}|{k[0]}": v for k, v in results.items()},
                                              indent=1, default=str))
    log(f"bench {size.name} done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
