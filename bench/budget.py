"""``make bench-budget``: the FLUX.1-dev pipeline shape (random weights) generating under memory
budgets: the plan chosen, the predicted and measured peak resident memory, seconds per phase
(encode, denoise, decode) and the PSNR of each plan's image against the unquantized
transformer's (the same pipeline loaded as written, bf16, one phase resident at a time).

Each step runs in its own process: `diffquant quantize SRC DST --plan BUDGET` (the plan and the
pre-quantized copy, kept in the cache), then one generation measured by
diffquant.budget.measure (per-phase high-water marks). Heavy runs share the machine: each
child runs under ``flock $DIFFQUANT_BENCH_CACHE/heavy.lock``.

    python -m bench.budget                                  # full scale, 16GB and 8GB
    python -m bench.budget --scale reduced --budgets 2.5GB 1.6GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.budget_model import CACHE, ensure_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle above a blue square"


def _env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "DIFFQUANT_BENCH_CACHE": str(CACHE),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")])}


def _heavy(cmd: list[str]) -> str:
    lock = ["flock", str(CACHE / "heavy.lock")] if os.environ.get("BENCH_NO_LOCK") != "1" else []
    out = subprocess.run(lock + cmd, env=_env(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def mmap_model(cls, folder: Path, dtype=None):
    """``cls`` from ``folder``'s config.json with every tensor a view of its safetensors file
    mapped copy-on-write (MAP_PRIVATE): file-backed pages the kernel drops under pressure and
    reads again, so a model larger than the RAM (FLUX.1-dev's 23.8 GB transformer in bf16, on
    a 23 GiB machine without swap) still runs; it is counted in the resident memory while
    mapped in. ``dtype``: cast to it where the file holds another (that copies)."""
    import mmap

    import torch

    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
              if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**config)
    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            stored = getattr(torch, _DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            count = (end - start) // stored.itemsize
            flat = torch.frombuffer(buf, dtype=stored, count=count, offset=8 + n + start) \
                if count else torch.empty(0, dtype=stored)
            state[key] = flat.reshape(info["shape"])
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None and any(t.dtype != dtype for t in state.values() if t.is_floating_point()):
        model = model.to(dtype)
    return model.eval()


def child(model: str, budget: str, size: int, steps: int, image: str, dtype: str,
          mapped: bool = False) -> dict:
    """One measured generation (run in a fresh process); ``mapped``: the transformer
    memory-mapped (mmap_model), for the unquantized reference."""
    import numpy as np
    import torch

    from diffquant import FluxPipeline, FluxTransformer2DModel
    from diffquant.budget.measure import measure_call

    torch.set_num_threads(2)
    pipe = FluxPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype), max_memory=budget)
    if mapped:
        residency, load = pipe._residency, pipe._residency.loader
        residency.loader = lambda name: load(name) if name != "transformer" else \
            mmap_model(FluxTransformer2DModel, Path(model) / name, getattr(torch, dtype))
        residency.sizes["transformer"] = 0  # pages of a file: not held against the budget
    pipe.set_progress_bar_config(disable=True)
    anon = _sample_anonymous()
    stats = measure_call(pipe, PROMPT, height=size, width=size, num_inference_steps=steps,
                         max_sequence_length=512, output_type="np",
                         generator=torch.Generator().manual_seed(0))
    np.save(image, stats.pop("output").images)
    return stats | {"tiled": bool(pipe.vae.use_tiling), "anonymous_peak": anon()}


def _sample_anonymous():
    """Sample this process's anonymous resident memory (RssAnon: the heap, not mapped file
    pages) every 0.2 s in a thread; returns a function giving the largest seen (bytes)."""
    import threading
    import time

    seen = [0]

    def sample():
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    seen[0] = max(seen[0], int(line.split()[1]) * 1024)
            time.sleep(0.2)

    if Path("/proc/self/status").is_file():
        threading.Thread(target=sample, daemon=True).start()
    return lambda: seen[0]


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _run(model: Path, budget: str, args, name: str, mapped: bool = False) -> dict:
    image, saved = CACHE / f"{name}.npy", CACHE / f"{name}.json"
    if args.reuse and saved.is_file() and image.is_file():
        return json.loads(saved.read_text()) | {"image": image}
    out = _heavy([sys.executable, "-m", "bench.budget", "--child", str(model), budget,
                  str(args.size), str(args.steps), str(image), args.dtype, str(int(mapped))])
    saved.write_text(out.strip().splitlines()[-1] + "\n")
    return json.loads(saved.read_text()) | {"image": image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=["full", "reduced", "small"])
    ap.add_argument("--budgets", nargs="+", default=["16GB", "8GB"])
    ap.add_argument("--reference-budget", default="64GB", help="the unquantized run's budget")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="unquantized weights and compute (bf16 convolutions are slow on CPUs "
                    "without AVX512-BF16)")
    ap.add_argument("--reuse", action="store_true", help="take a run's measurements and image "
                    "from the cache where an earlier bench saved them (default: run again)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, budget, size, steps, image, dtype, mapped = args.child
        print(json.dumps(child(model, budget, int(size), int(steps), image, dtype,
                               mapped == "1")))
        return
    import numpy as np

    CACHE.mkdir(parents=True, exist_ok=True)
    src = ensure_pipeline(args.scale)
    rows = []
    for budget in args.budgets:  # each budget's plan and run, then the reference (the slowest)
        dst = CACHE / f"budget-{args.scale}-{args.dtype}-{args.size}-{budget}"
        try:
            if not (dst / "budget_plan.json").is_file():
                print(_heavy([sys.executable, "-m", "diffquant", "quantize", str(src), str(dst),
                              "--plan", budget, "--dtype", args.dtype, "--height",
                              str(args.size), "--overwrite", "-q"]), flush=True)
            plan = json.loads((dst / "budget_plan.json").read_text())
            rows.append((budget, plan, _run(dst, budget, args, f"budget-{args.scale}-{budget}")))
        except SystemExit as err:  # a budget that fails is reported; the others still run
            print(err, file=sys.stderr, flush=True)
            rows.append((budget, None, {"error": str(err).splitlines()[-1][:200]}))
        print(f"{budget}: {rows[-1][2]}", flush=True)
    # the reference's transformer memory-mapped: in bf16 it outgrows the RAM at full scale
    ref = _run(src, args.reference_budget, args, f"budget-{args.scale}-reference", mapped=True)
    rows.insert(0, (f"unquantized ({args.dtype}), transformer memory-mapped", None, ref))
    print(table([(b, p, got, psnr(np.load(got["image"]), np.load(ref["image"]))
                  if "image" in got else float("nan")) for b, p, got in rows], args))


def _schemes(plan) -> str:
    if plan is None:
        return "every component unquantized"
    parts = [f"{c['component']} {c['scheme']}" + (f" ({c['group']})" if c["group"] != "all" else "")
             for c in plan["choices"] if c["scheme"] != "float" or c["group"] != "all"]
    return "; ".join(parts) or "every component unquantized"


def table(rows, args) -> str:
    lines = [f"| max_memory ({args.scale}, {args.size}x{args.size}, {args.steps} steps) | plan | "
             "predicted peak GB | measured peak GB | encode s | denoise s | decode s | PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    for budget, plan, got, quality in rows:
        if "error" in got:
            lines.append(f"| {budget} | failed: {got['error']} | | | | | | |")
            continue
        ph = got["phases"]
        pred = f"{plan['peak'] / 1e9:.2f}" if plan else "-"
        anon = got.get("anonymous_peak")  # runs saved before it was measured lack it
        peak = f"{got['peak'] / 1e9:.2f}" + ("" if plan or anon is None else
                                            f" with the mapped file's pages, {anon / 1e9:.2f} "
                                            "without")
        lines.append(f"| {budget} | {_schemes(plan)} | {pred} | {peak} | "
                     f"{ph['encode']['seconds']:.1f} | {ph['denoise']['seconds']:.1f} | "
                     f"{ph['decode']['seconds']:.1f} | {quality:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
