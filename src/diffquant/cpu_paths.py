"""Which kernels a quantized layer runs on this machine, per scheme and row count, found by
running it: every scheme the CLI lists quantizes one Flux-shaped linear layer, which then
takes one row (a modulation or embedder layer), a few rows and many rows (image tokens), and
the C kernels (by name, as ``ops/native/registry.py`` calls them) and the torch ops that did the work are
recorded. The answer depends on the CPU (AVX-512, AMX, VNNI, a bf16 matmul kernel in torch)
and on the build of the kernels (``DIFFQUANT_MARCH``), so the probe is the ground truth:
docs/performance.md's table per CPU family is this command's output on each.

    python -m diffquant.ops            # or: diffquant inspect --kernels

Example:
    >>> rows = probe("torchao:int8wo", rows=(1,))
    >>> sorted(rows)
    [1]
"""

from __future__ import annotations

import platform

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.native import build as native
from .ops.native import registry
from .quantizers import DiffusersAutoQuantizer
from .spec import available_backends, backend_schemes, diffquant_config, parse_spec

ROWS = (1, 4, 256)  # a modulation layer's one row, a few, a block of image tokens
# the torch ops that do a product's work (the rest is bookkeeping)
_WORK = {"mm", "addmm", "bmm", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu",
         "_scaled_mm", "linear", "matmul"}  # and every op of bitsandbytes' and quanto's own


class _Recorder(TorchDispatchMode):
    """Records the work-doing torch ops, with the dtype of their first input."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in _WORK or func.namespace in ("bitsandbytes", "quanto"):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            dtype = "" if first is None else str(first.dtype).replace("torch.", "")
            self.seen.append(f"{name}({dtype})" if dtype else name)
        return func(*args, **(kwargs or {}))


def _layer(spec: str, n: int, k: int) -> nn.Module:
    """One Linear [n, k] with a bias, quantized as ``spec`` the way from_pretrained does it,
    computing in bf16 (diffusers' GGUF and bitsandbytes 4-bit configs default to float32)."""
    config = diffquant_config(parse_spec(spec))
    for field in ("compute_dtype", "bnb_4bit_compute_dtype"):
        if hasattr(config, field):
            setattr(config, field, torch.bfloat16)
    quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
    quantizer.update_torch_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(k, n))
    quantizer.preprocess_model(model)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    quantizer.create_quantized_param(model, "0.weight", weight, torch.bfloat16, None)
    model[0].bias = nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16) * 0.02,
                                 requires_grad=False)
    quantizer.postprocess_model(model)
    return model.eval()


def _paths(model: nn.Module, rows: int, k: int) -> str:
    """What one forward of ``rows`` bf16 rows ran: C kernels first, then torch's work ops."""
    ops = []
    x = torch.randn(rows, k).to(torch.bfloat16)
    with torch.no_grad(), _Recorder(ops), registry.trace() as kernels:
        model(x)
    done = [f"C {name}" for name in dict.fromkeys(kernels)] + list(dict.fromkeys(ops))
    return " + ".join(done) or "torch elementwise ops"


def probe(spec: str, rows=ROWS, n: int = 256, k: int = 512) -> dict[int, str]:
    """{rows: the kernels one forward ran} for ``spec`` ("backend:scheme") on this machine.
    Each row count runs twice and reports the second (the first builds prepared forms)."""
    model = _layer(spec, n, k)
    out = {}
    for m in rows:
        _paths(model, m, k)
        out[m] = _paths(model, m, k)
    return out


def cpu_summary() -> str:
    """This CPU's relevant instruction sets and torch's bf16 matmul support, one line."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
           if f in flags]
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (f"{platform.processor() or platform.machine()}: {' '.join(isa) or 'no AVX2'}; "
            f"torch bf16 matmul kernel: {'yes' if bf16 is not None and bf16() else 'no'}; "
            f"C kernels: {native.march() if native.available() else 'off'} build, "
            f"{native.threading_kind()}")


def table(schemes=None, rows=ROWS) -> str:
    """A Markdown table: each CLI scheme, the kernels it runs at each row count."""
    if schemes is None:
        schemes = [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]
    head = ["scheme", *[f"{m} row{'s' if m > 1 else ''}" for m in rows]]
    lines = [cpu_summary(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in schemes:
        try:
            found = probe(spec, rows)
            cells = [found[m] for m in rows]
        except Exception as e:  # a scheme this machine cannot run: say why in its row
            cells = [f"n/a ({type(e).__name__}: {str(e)[:60]})"] + [""] * (len(rows) - 1)
        lines.append("| " + " | ".join([f"`{spec}`", *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
