"""``python -m bench.scale`` (``make bench-scale``): every backend at FLUX.1-dev's size.

Writes the 23.8 GB FLUX.1-dev-shaped bf16 checkpoint (19 double + 38 single blocks, width 3072,
random weights) once, tensor by tensor, into the bench cache (DIFFQUANT_BENCH_CACHE, default
bench/.cache); then loads it per scheme, each load in its own child process, diffquant and
diffusers side by side where diffusers runs, and prints one table: load seconds and GB/s of
checkpoint, peak resident memory during the load and resident memory after two forwards (both
above the child's baseline, and as a multiple of the model's bytes), the footprint
get_memory_footprint reports, and seconds per forward at 256 and 1024 image tokens (64 text
tokens). A child resident past ``--limit-gib`` is killed (diffusers' torchao int8 load passes
20 GiB on a 23 GiB machine), and the limit is printed.

Example:
    python -m bench.scale --only "bnb nf4,gguf Q4_0"          # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import model as bm
from bench.runner import Runner
from bench.schemes import config_of, diffusers_gap, enumerate_schemes

DEFAULT = ("torchao int8wo", "torchao int8dq", "bnb nf4", "bnb llm_int8",
           "gguf Q4_0 (compute float32)", "gguf Q8_0 (compute bfloat16)", "quanto int8",
           "modelopt INT8")
HEADER = ("scheme", "library", "load s (GB/s)", "peak during load, above baseline",
          "footprint reported", "resident after two forwards, above baseline",
          "forward s, 256 tokens", "forward s, 1024 tokens")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None,
                   help="comma-separated labels (or parts of them) to run; default: " +
                   "; ".join(DEFAULT))
    p.add_argument("--limit-gib", type=float, default=None,
                   help="kill a child past this resident size (default: 85%% of MemTotal)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", default="dev", choices=sorted(bm.SIZES),
                   help="the checkpoint (dev: FLUX.1-dev's; smoke: a toy, to try the script)")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--no-forward", action="store_true", help="loads only")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    return p.parse_args(argv)


def mem_total() -> int:
    with open("/proc/meminfo") as fh:
        return int(fh.readline().split()[1]) * 1024


def schemes_of(only: str | None):
    wanted = [w.strip() for w in only.split(",")] if only else list(DEFAULT)
    every, out = enumerate_schemes(None), []
    for w in wanted:                                     # in the order asked
        match = [s for s in every if s.label == w] or [s for s in every if w in s.label]
        out += [s for s in match if s not in out]
    return out


def jobs_of(schemes, ckpt: Path, args, outdir: Path):
    for s in schemes:
        base = dict(label=s.label, scheme=vars(s), size=args.size, checkpoint=str(ckpt),
                    dtype=s.dtype, threads=args.threads, speed=not args.no_forward)
        yield s, "diffquant", dict(base, lib="diffquant")
        if args.no_diffusers:
            continue
        config = config_of(s)
        gap = diffusers_gap(config)
        if gap is None and s.backend == "gguf":  # it loads only .gguf files: 24 GB more to write
            gap = "n/a (diffusers cannot quantize GGUF on load)"
        yield s, "diffusers", {"na": gap} if gap else dict(base, lib="diffusers")


def row(label: str, lib: str, res: dict, nbytes: int) -> list[str]:
    if "na" in res:
        return [label, lib, res["na"], "", "", "", "", ""]
    gib = 2 ** 30
    model = res.get("footprint_reported") or res.get("model_bytes")
    base = res.get("baseline", 0)

    def above(value):
        if value is None or not model:
            return ""
        return f"{(value - base) / gib:.2f} GiB ({(value - base) / model:.2f}x)"

    load = f"{res['load_s']:.1f} ({nbytes / 1e9 / res['load_s']:.2f})" if "load_s" in res else \
        res.get("error", "")
    after = next(iter((res.get("rss_after") or {}).values()), None)  # the first count's two
    steps = list((res.get("step_s") or {}).values()) + [None, None]
    cells = [label, lib, load, above(res.get("peak")),
             f"{model / 1e9:.2f} GB" if model else "", above(after),
             *(f"{t:.1f}" if t is not None else "" for t in steps[:2])]
    if "error" in res and "load_s" in res:
        cells[-1] += f" [{res['error'][:80]}]"
    return cells


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    limit = int((args.limit_gib or mem_total() * 0.85 / 2**30) * 2**30)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    size = bm.SIZES[args.size]
    ckpt = bm.ensure_checkpoint(size, log=log)
    nbytes = (ckpt / bm.WEIGHTS).stat().st_size
    log(f"bench scale: {ckpt} ({nbytes / 1e9:.1f} GB); each child killed past "
        f"{limit / 2**30:.1f} GiB resident; {args.threads} threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffquant-scale-") as tmp:
        runner = Runner(False, args.timeout, Path(tmp), limit_bytes=limit)
        for s, lib, job in jobs_of(schemes_of(args.only), ckpt, args, Path(tmp)):
            start = time.perf_counter()
            res = job if "na" in job else runner.run(job)
            rows.append(row(s.label, lib, res, nbytes))
            log(" | ".join(rows[-1]) + f"  ({time.perf_counter() - start:.0f} s)")
    lines = [f"Each child killed past {limit / 2**30:.1f} GiB resident; {args.threads} threads; "
             f"checkpoint {nbytes / 1e9:.1f} GB bf16 in {ckpt}.",
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
