"""Step time with 0, 1, 2 and 4 LoRA adapters per backend, at Flux width, in one markdown table.

    python -m bench.lora            # width 3072, 1 double + 1 single block, 1024 image + 256 text
                                    # tokens, rank 64 on every linear of the blocks (~10 minutes)
    python -m bench.lora --quick    # width 1024, 256 image + 64 text tokens (a minute or two)
    python -m bench.lora --schemes bf16 gguf:q8_0   # (float32: the unquantized model in float32)

Each scheme runs in its own child process (2 torch threads, glibc told to reuse freed memory as
bench.fast does): the transformer is quantized while loading the cached bf16 checkpoint
(bench.model), four rank-64 adapters are loaded, then rounds of forwards run with none (disable_lora),
the first one, two and all four (set_adapters), one forward each per round after a warm-up; the
best of the rounds is reported, so slow moments of a shared machine fall out of every column
alike. "per adapter" is (c_n / c_0 - 1) / n over the process's CPU seconds (best of the rounds),
which other processes on a shared machine disturb less than the wall-clock seconds shown. Then
the first adapter is fused (fuse_lora: the seconds it takes) and a forward timed with it fused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.fast import QUIET_MALLOC, THREADS
from bench.model import Size, ensure_checkpoint

SIZES = {
    "full": Size("lora", heads=24, double=1, single=1, image_tokens=(1024,), text_tokens=256),
    "quick": Size("quick", heads=8, double=1, single=1, image_tokens=(256,), text_tokens=64),
}
SCHEMES = ["bf16", "torchao:int8wo", "torchao:int8dq", "gguf:q8_0", "gguf:q4_k", "quanto:int8",
           "bitsandbytes:nf4", "modelopt:int8"]
UNQUANTIZED = {"bf16": "bfloat16", "float32": "float32"}  # scheme -> torch_dtype, not quantized


def default_schemes() -> list[str]:
    """SCHEMES; on a CPU where torch has no bf16 matmul kernel (AVX2 only), the unquantized row
    is float32: torch's generic bf16 loop takes minutes for one forward at this size there."""
    import torch

    from diffquant.ops.cpu.dispatch import float32_product

    slow = float32_product(torch.empty(1, dtype=torch.bfloat16))
    return ["float32" if s == "bf16" and slow else s for s in SCHEMES]


COUNTS = (0, 1, 2, 4)
RANK = 64


def _adapter(model, seed: int, rank: int) -> dict:
    """Rank-``rank`` factors on every nn.Linear / quantized linear of the blocks, bf16."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in model.named_modules():
        if "blocks." in name and hasattr(module, "in_features") and hasattr(module, "out_features"):
            sd[f"transformer.{name}.lora_A.weight"] = \
                (torch.randn(rank, module.in_features, generator=gen) * 0.01).bfloat16()
            sd[f"transformer.{name}.lora_B.weight"] = \
                (torch.randn(module.out_features, rank, generator=gen) * 0.01).bfloat16()
    return sd


def run_child(job: dict) -> dict:
    import torch

    from bench.model import make_inputs
    from diffquant import FluxTransformer2DModel
    from diffquant.spec import diffquant_config, parse_spec

    torch.set_num_threads(THREADS)
    size = SIZES[job["size"]]
    plain = UNQUANTIZED.get(job["scheme"])
    config = None if plain else diffquant_config(parse_spec(job["scheme"]))
    dtype = getattr(torch, plain or "bfloat16")
    model = FluxTransformer2DModel.from_pretrained(job["checkpoint"], quantization_config=config,
                                                   torch_dtype=dtype)
    names = [f"a{i}" for i in range(max(COUNTS))]
    for i, name in enumerate(names):
        model.load_lora_adapter(_adapter(model, i, job["rank"]), adapter_name=name)
    inputs = {k: v.to(dtype) if v.is_floating_point() and k.endswith(("states", "projections"))
              else v for k, v in make_inputs(size, size.image_tokens[0]).items()}
    best = {n: float("inf") for n in COUNTS}
    cpu = dict(best)

    def forward() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model(**inputs, return_dict=False)
        return time.perf_counter() - t0, time.process_time() - c0

    forward()  # warm-up: lazy packed weights, reused buffers, kernel choices
    for _ in range(job["rounds"]):
        for n in COUNTS:
            model.set_adapters(names[:n]) if n else model.disable_lora()
            if n:
                model.enable_lora()
            wall, used = forward()
            best[n], cpu[n] = min(best[n], wall), min(cpu[n], used)
    model.set_adapters(names[:1])
    t0 = time.perf_counter()
    model.fuse_lora()
    fuse_s = time.perf_counter() - t0
    fused = min(forward()[0] for _ in range(job["rounds"]))
    adapter_mb = sum(p.numel() * p.element_size() for p in model.lora_layers.parameters()) \
        / len(names) / 2**20
    return {"times": best, "cpu": cpu, "fuse_s": fuse_s, "fused_s": fused, "adapter_mb": adapter_mb}


def _child(job: dict, timeout: float) -> dict:
    env = {**os.environ, **QUIET_MALLOC, "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, "-m", "bench.lora", "--child", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict) -> list[str]:
    head = " | ".join(f"{n} adapters s" for n in COUNTS)
    rows = [f"| scheme | {head} | per adapter, CPU s (1 / 2 / 4) | fuse_lora s | 1 fused s | "
            "MB / adapter |",
            "|---|" + "---:|" * (len(COUNTS) + 4)]
    for scheme, r in results.items():
        if "error" in r:
            rows.append(f"| {scheme} | {r['error']} |")
            continue
        t = {int(k): v for k, v in r["times"].items()}
        c = {int(k): v for k, v in r["cpu"].items()}
        per = " / ".join(f"{(c[n] / c[0] - 1) / n:+.1%}" for n in COUNTS if n)
        rows.append(f"| {scheme} | " + " | ".join(f"{t[n]:.2f}" for n in COUNTS) +
                    f" | {per} | {r['fuse_s']:.1f} | {r['fused_s']:.2f} | {r['adapter_mb']:.0f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--schemes", nargs="+", default=None, help="default: " + " ".join(SCHEMES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    checkpoint = str(ensure_checkpoint(size, log=lambda m: print(m, file=sys.stderr)))
    results = {}
    for scheme in args.schemes or default_schemes():
        print(f"[bench.lora] {scheme} ...", file=sys.stderr, flush=True)
        results[scheme] = _child({"size": size_name, "scheme": scheme, "checkpoint": checkpoint,
                                  "rounds": args.rounds, "rank": args.rank}, args.timeout)
    import platform

    import torch

    print(f"Flux-width transformer: width {size.width}, {size.double} double + {size.single} "
          f"single blocks; {size.image_tokens[0]} image + {size.text_tokens} text tokens, batch 1, "
          f"bf16 (quantized: their compute dtype); rank-{args.rank} adapters on every linear of "
          f"the blocks; {THREADS} threads; "
          f"best of {args.rounds} rounds; {platform.machine()}, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} (shared machine)\n")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
