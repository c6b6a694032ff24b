"""The probe: which kernels a quantized layer runs on this machine, per scheme and row count,
found by running it. Every scheme the CLI lists quantizes one Flux-shaped linear layer, which
then takes one row (a modulation or embedder layer), a few rows and many rows (image tokens),
and the C kernels (by name, as ``ops/native/registry.py`` calls them) and the torch ops that did
the work are recorded. ``ops/cpu/dispatch.py`` says the same from its table
(``dispatch.predict``); tests/test_dispatch.py checks the two agree on every build of the C
kernels this machine executes.

    python -m diffquant.ops --probe

Example:
    >>> rows = probe("torchao:int8wo", rows=(1,))
    >>> sorted(rows)
    [1]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.cpu import dispatch
from .ops.native import registry
from .quantizers import DiffusersAutoQuantizer
from .spec import available_backends, backend_schemes, diffquant_config, parse_spec

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


def probe(spec: str, rows=dispatch.ROWS, n: int = 256, k: int = 512) -> dict[int, str]:
    """{rows: the kernels one forward ran} for ``spec`` ("backend:scheme") on this machine.
    Each row count runs twice and reports the second (the first builds prepared forms)."""
    model = _layer(spec, n, k)
    out = {}
    for m in rows:
        _paths(model, m, k)
        out[m] = _paths(model, m, k)
    return out


def table(schemes=None, rows=dispatch.ROWS) -> str:
    """A Markdown table: each CLI scheme, the kernels it runs at each row count."""
    if schemes is None:
        schemes = [f"{b}:{s}" for b in available_backends() for s in backend_schemes(b)]
    found = []
    for spec in schemes:
        try:
            paths = probe(spec, rows)
            cells = [paths[m] for m in rows]
        except Exception as e:  # a scheme this machine cannot run: say why in its row
            cells = [f"n/a ({type(e).__name__}: {str(e)[:60]})"] + [""] * (len(rows) - 1)
        found.append([f"`{spec}`", *cells])
    head = ["scheme", *[f"{m} row{'s' if m > 1 else ''}" for m in rows]]
    return "\n".join([dispatch.machine(), "", *dispatch.markdown(head, found)])
