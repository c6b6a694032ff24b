"""Micro-benchmark of the fast quantized linear kernels (``diffquant.ops.cpu.linear``).

For each format and number of rows: milliseconds of a bf16 and a float32 ``F.linear``, of the
format's reference forward (dequantize-then-matmul, as the backend layers do today), of the
fast path, and of the layer diffusers runs for the same scheme, built with its library from the
same weights (``bench/kernel_refs.py``: torchao, diffusers' GGUFLinear, optimum.quanto,
bitsandbytes), with the ratios fast / bf16 and fast / library. The candidates are timed in
turn, round after round, and the median is reported, so a loaded machine slows them alike.
Under each table, how far the fast output is from the library's (max |fast - library| /
max |library|), so like is compared with like.

    python -m bench.kernels                       # 3072x3072 (Flux width), rows 1 16 256 1280
    python -m bench.kernels --rows 1 64 --formats Q4_0 int8dq quanto-int4 --reps 9
    python -m bench.kernels --rows 1 --stream 16  # also: one row through 16 distinct layers

One call from flushed caches is not what a model sees: there the previous op's threads are still
awake and the weight streams from memory behind the one before it. ``--stream`` times that: a
row through a chain of distinct layers per format, caches flushed once per pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

# Before torch loads: the thread count for OpenMP/MKL. OpenMP's wait policy is left as the user
# has it (the default: workers spin a little after each parallel region, then sleep), as in a
# user's process: forcing PASSIVE made every op, torch's and the C kernels', wake a sleeping
# worker, a cost a model's back-to-back ops do not pay. Run it with nothing else on the machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffquant.ops.cpu import gguf as fg  # noqa: E402
from diffquant.ops.cpu import int4 as f4  # noqa: E402
from diffquant.ops.cpu import dispatch  # noqa: E402
from diffquant.ops.cpu import int8 as ci8  # noqa: E402
from diffquant.ops.cpu import int8_dynamic as fi  # noqa: E402
from diffquant.ops.cpu import linear as fl  # noqa: E402
from diffquant.ops.formats import gguf as gd  # noqa: E402
from diffquant.ops.cpu import quantize as cq  # noqa: E402
from diffquant.ops.formats import torchao as iq  # noqa: E402

from .kernel_refs import agreement, int4_group, library_layer  # noqa: E402

BF16 = torch.bfloat16
FORMATS = ("int8dq", "int8wo", "int4wo", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
           "quanto int8", "quanto int4", "bnb nf4")


def _kquant_blocks(n, k, qtype):
    """Valid Q4_K/Q6_K blocks (gguf-py cannot quantize to them): random codes, sane scales."""
    block, size = gd.BLOCK_LAYOUT[gd.ggml_type(qtype)]
    if k % block:
        raise ValueError(f"{qtype} needs K to be a multiple of {block}, got K={k}")
    b = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8)
    for off in {"Q4_K": (0, 2), "Q6_K": (208,)}[qtype]:
        b[..., off:off + 2] = (torch.rand(n, k // block, 1) * 0.01 + 0.001).half().view(torch.uint8)
    return b.reshape(n, -1)


def build(fmt: str, w: torch.Tensor, bias: torch.Tensor):
    """w [N, K] float32 -> (reference forward, fast forward, packed-kernel rows, library forward
    or "n/a: reason"), each forward x [M, K] bf16 -> [M, N]."""
    ref, fast, small, blocks = _build(fmt, w, bias)
    return ref, fast, small, library_layer(fmt, w, bias, blocks)


def _build(fmt, w, bias):
    wb = w.to(BF16)
    if fmt in ("int8dq", "int8wo"):
        q, s = cq.int8_quantize_per_channel(wb)
        if fmt == "int8dq":
            p = fi.prepare_int8_dynamic(q, s)
            return (lambda x: iq.int8_dynamic_linear(x, q, s, bias),
                    lambda x: fi.linear_int8_dynamic(x, p, bias), None, None)
        p = ci8.prepare_int8_weight(q, s)
        return (lambda x: iq.int8_weight_only_linear(x, q, s, bias),
                lambda x: fl.linear_weight_only(x, p, bias), p.small_rows, None)
    if fmt == "int4wo":
        packed, scale, zero = cq.int4_quantize_groupwise(wb, int4_group(w.shape[1]))
        p = f4.prepare_int4_weight(packed, scale, zero)
        def ref(x):  # Int4WeightOnlyLinear.forward
            return torch.matmul(x, iq.int4_dequantize(packed, scale, zero, BF16).t()) + bias

        return ref, lambda x: fl.linear_weight_only(x, p, bias), p.small_rows, None
    if fmt.startswith("quanto"):
        return _build_quanto(fmt, wb, bias) + (None,)
    if fmt == "bnb nf4":
        return _build_bnb(wb, bias) + (None,)
    blocks = _kquant_blocks(*w.shape, fmt) if fmt in ("Q4_K", "Q6_K") else gd.quantize(w, fmt)
    p = fg.prepare_gguf_weight(blocks, fmt)
    return (lambda x: F.linear(x, gd.dequantize(blocks, fmt, BF16), bias),
            lambda x: fl.linear_weight_only(x, p, bias), p.small_rows if (p.packed or p.make_packed) else 0, blocks)


def _build_quanto(fmt, wb, bias):
    """diffquant's QuantoLinear quantizing wb (quanto's own quantization); the reference is the
    same layer with its fast path off (quanto's qbytes_mm for int8, dequantize + matmul int4)."""
    from diffquant.quantizers.quanto import QuantoLinear

    def layer(fast):
        m = QuantoLinear(wb.shape[1], wb.shape[0], True, weights_dtype=fmt.split()[1])
        m.load_piece("weight", wb, pre_quantized=False, dtype=None, device=None)
        m.bias = torch.nn.Parameter(bias, requires_grad=False)
        if not fast:
            m.use_fast_path = lambda x: False
        return m

    fast = layer(True)
    p = fast._prepare()
    return layer(False), fast, p.small_rows if (p.packed or p.make_packed) else 0


def _build_bnb(wb, bias):
    """diffquant's BnB4BitLinear (NF4, bitsandbytes' own quantization); the reference is the
    same layer with its fast path off (bitsandbytes' matmul_4bit). The fast path is a C product
    for one row and bitsandbytes' dequantization in C for more."""
    from diffquant.quantizers.bitsandbytes import BnB4BitLinear

    def layer(fast):
        with torch.device("meta"):
            m = BnB4BitLinear(wb.shape[1], wb.shape[0], True, quant_type="nf4")
        m.load_piece("weight", wb, pre_quantized=False, dtype=BF16, device=None)
        m.bias = torch.nn.Parameter(bias, requires_grad=False)
        if not fast:
            m.use_fast_path = lambda x: False
        return m

    return layer(False), layer(True), 1


_EVICT: list = []  # a buffer larger than the last-level cache, written before each timed call


def _evict_caches() -> None:
    """Push the weights out of the CPU caches: in a model the weights (GBs) come from memory
    once per forward, not from an L3 that still holds the 19 MB of the previous call."""
    if not _EVICT:
        with torch.inference_mode(False):  # tables run under inference_mode, quanto's under no_grad
            _EVICT.append(torch.empty(64 << 20, dtype=torch.uint8))
    _EVICT[0].fill_(1)


def timed(fns: dict, reps: int) -> dict:
    """Median milliseconds of each callable, timed in turn for ``reps`` rounds after a warm-up,
    each call from cold caches."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            _evict_caches()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def table(fmt: str, n: int, k: int, rows, reps: int) -> str:
    torch.manual_seed(0)
    w, bias = torch.randn(n, k) * 0.02, torch.randn(n) * 0.1
    wb, bb = w.to(BF16), bias.to(BF16)
    try:
        ref, fast, small, lib = build(fmt, w, bb)
    except (ValueError, RuntimeError) as e:  # a shape the format cannot hold (K-quants: K % 256)
        return f"### {fmt} ({n}x{k}): n/a: {str(e).splitlines()[0]}"
    path = "int8 x int8 -> int32 matmul" if small is None else \
        f"packed kernel up to {small} rows" if small else "always dequantize"
    lines = [f"### {fmt} ({n}x{k}; fast path: {path})", "",
             "| rows | bf16 ms | fp32 ms | reference ms | fast ms | library ms | fast / bf16 "
             "| fast / library |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    agree = []
    # quanto's int4 CPU layer fails under inference_mode, so quanto is timed under no_grad; the
    # scratch buffers made under inference_mode by earlier tables are inference tensors, which
    # cannot be written outside it (diffquant's own fast path fails there too): start afresh.
    mode = torch.no_grad if fmt.startswith("quanto") else torch.inference_mode
    fl.clear_scratch()
    for m in rows:
        x = torch.randn(m, k).to(BF16)
        xf = x.float()
        fns = {"bf16": lambda: F.linear(x, wb, bb), "fp32": lambda: F.linear(xf, w, bias),
               "ref": lambda: ref(x), "fast": lambda: fast(x)}
        if callable(lib):
            fns["lib"] = lambda: lib(x)
        with mode():
            if callable(lib):
                agree.append(f"{m} rows {agreement(fast(x), lib(x)):.4f}")
            ms = timed(fns, reps)
        libs = (f"{ms['lib']:.2f}", f"{ms['fast'] / ms['lib']:.2f}") if callable(lib) else \
            (lib, "n/a")
        lines.append(f"| {m} | {ms['bf16']:.2f} | {ms['fp32']:.2f} | {ms['ref']:.2f} | "
                     f"{ms['fast']:.2f} | {libs[0]} | {ms['fast'] / ms['bf16']:.2f} | {libs[1]} |")
    if agree:
        lines += ["", "max |fast - library| / max |library|: " + ", ".join(agree)]
    return "\n".join(lines)


def _llc_bytes() -> int:
    """The largest CPU cache's size, from sysfs (64 MB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=64 << 20)


_FLUSH: list = []  # twice the last-level cache, for the chains of stream_table


def _flush_all_caches() -> None:
    """Write, then read, a buffer twice the last-level cache: no weight is left in any cache
    and no dirty line of the buffer is left to be written back during the timed pass."""
    if not _FLUSH:
        with torch.inference_mode(False):
            _FLUSH.append(torch.empty(2 * _llc_bytes(), dtype=torch.uint8))
    _FLUSH[0].fill_(2)
    _FLUSH[0].view(torch.int64).max()


def stream_table(formats, n: int, k: int, layers: int, passes: int) -> str:
    """One row through a chain of ``layers`` distinct layers per format, as a model's modulation
    linears run: the caches flushed before each pass (each weight then comes from memory once),
    no flush between the layers of a pass (the threads of the last op still awake). Milliseconds
    per layer, the median of ``passes``, for bf16, diffquant's fast path and diffusers' layer."""
    lines = [f"### One row through {layers} distinct {n}x{k} layers per format (caches flushed "
             "before each pass, not between layers)", "",
             "| format | bf16 ms/layer | fast ms/layer | library ms/layer | fast / bf16 | "
             "fast / library |", "|---|---:|---:|---:|---:|---:|"]
    torch.manual_seed(0)
    x = torch.randn(1, k).to(BF16)
    for fmt in formats:
        chains = {"bf16": [], "fast": [], "lib": []}
        try:
            for _ in range(layers):
                w, bias = torch.randn(n, k) * 0.02, (torch.randn(n) * 0.1).to(BF16)
                wb = w.to(BF16)
                _, fast, _, lib = build(fmt, w, bias)
                chains["bf16"].append(lambda x, wb=wb, b=bias: F.linear(x, wb, b))
                chains["fast"].append(fast)
                chains["lib"].append(lib if callable(lib) else None)
        except (ValueError, RuntimeError) as e:
            lines.append(f"| {fmt} | n/a: {str(e).splitlines()[0]} | | | | |")
            continue
        if None in chains["lib"]:
            del chains["lib"]
        mode = torch.no_grad if fmt.startswith("quanto") else torch.inference_mode
        fl.clear_scratch()
        times = {name: [] for name in chains}
        with mode():
            for chain in chains.values():  # warm-up: lazy packed forms, first-call choices
                for f in chain:
                    f(x)
            for _ in range(passes):
                for name, chain in chains.items():
                    _flush_all_caches()
                    t0 = time.perf_counter()
                    for f in chain:
                        f(x)
                    times[name].append((time.perf_counter() - t0) / layers)
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        lib_ms, vs_lib = (f"{ms['lib']:.3f}", f"{ms['fast'] / ms['lib']:.2f}") if "lib" in ms \
            else ("n/a", "n/a")
        lines.append(f"| {fmt} | {ms['bf16']:.3f} | {ms['fast']:.3f} | {lib_ms} | "
                     f"{ms['fast'] / ms['bf16']:.2f} | {vs_lib} |")
        del chains
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(3072, 3072), metavar=("N", "K"))
    ap.add_argument("--rows", type=int, nargs="+", default=(1, 16, 256, 1280))
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS,
                    type=lambda f: f.replace("-", " "))  # quanto-int8 = "quanto int8"
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    ap.add_argument("--stream", type=int, default=0, metavar="LAYERS",
                    help="also time one row through a chain of this many distinct layers")
    ap.add_argument("--passes", type=int, default=7, help="passes through the chain (median)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps}; "
          f"{dispatch.cpu_products()}\n")
    for fmt in args.formats:
        print(table(fmt, *args.shape, args.rows, args.reps) + "\n", flush=True)
    if args.stream:
        print(stream_table(args.formats, *args.shape, args.stream, args.passes) + "\n",
              flush=True)


if __name__ == "__main__":
    main()
