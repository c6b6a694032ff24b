"""GGUF blocks through the C kernels (``csrc/gguf_decode.c``, ``csrc/gguf_gemv.c`` and its Q4
rows in ``csrc/gguf_gemv_q4.c``): the decode of Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks into a
float32 or bf16 buffer, and the one-row product of the same blocks read in place. ``ops/cpu/gguf.py`` uses them.

Example:
    >>> import torch
    >>> from diffquant.ops.formats import gguf as gd
    >>> blocks = gd.quantize(torch.randn(4, 64), "Q8_0")
    >>> out = torch.empty(4, 64)
    >>> if supports(gd.GGMLType.Q8_0, out.device):
    ...     _ = decode_into(blocks, gd.GGMLType.Q8_0, out)
    ...     assert torch.equal(out, gd.dequantize(blocks, "Q8_0"))
"""

from __future__ import annotations

import torch

from ..formats.gguf import BLOCK_LAYOUT, GGMLType
from . import build, registry

DECODES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K)
GEMV_TYPES = DECODES  # the one-row product reads each of them in place
# ids as ints, and their bytes per block: a one-row product's lookups (an enum lookup costs
# ~10 us there, 1% of it)
_DECODE_IDS = {int(t) for t in DECODES}
_GEMV_IDS = {int(t) for t in GEMV_TYPES}
_BLOCK_BYTES = {int(t): BLOCK_LAYOUT[t][1] for t in DECODES}


def supports(qtype, device: torch.device) -> bool:
    """Whether ``qtype`` blocks on ``device`` can use these kernels (CPU only; built)."""
    return torch.device(device).type == "cpu" and int(qtype) in _DECODE_IDS and build.available()


def _geometry(blocks: torch.Tensor, qtype) -> tuple[int, int]:
    size = _BLOCK_BYTES.get(int(qtype))
    if size is None:
        raise ValueError(f"native GGUF kernels take {[t.name for t in DECODES]}, got {qtype!r}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError("native GGUF kernels take contiguous uint8 blocks [N, bytes]")
    return blocks.shape[0], blocks.shape[1] // size


def decode_into(blocks: torch.Tensor, qtype, out: torch.Tensor, lib=None) -> torch.Tensor:
    """uint8 blocks [N, bytes] -> ``out`` [N, K] (float32 or bf16, rows contiguous), returned.
    Bit-identical to ``formats.gguf.dequantize(blocks, qtype, out.dtype)``. ``lib``: another
    build of the kernels (tests compare builds)."""
    n, groups = _geometry(blocks, qtype)
    if out.dtype not in (torch.float32, torch.bfloat16) or out.stride(1) != 1:
        raise ValueError("native GGUF decode writes float32 or bf16 rows with unit stride")
    registry.run("decode", n, lib=lib, qtype=int(qtype), blocks=blocks, n_blocks=groups, out=out,
                 ld_out=out.stride(0), out_bf16=out.dtype == torch.bfloat16)
    return out


def gemv(blocks: torch.Tensor, qtype, x2: torch.Tensor, portable: bool = False,
         lib=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ W.T (+ bias [N]) for W the blocks [N, bytes] of a type of ``GEMV_TYPES`` ->
    [1, N] in x's dtype, reading the blocks once.

    The weight is the reference's exact float32 values (the bf16 reference rounds them to bf16
    first: this is closer to the exact product, and within bf16 rounding of the reference); the
    sums run in float32 and are rounded once, then the bias is added as ``y.add_(bias)`` would
    (in C for a bf16 x and bias). ``portable``: the C loop without AVX-512."""
    n, groups = _geometry(blocks, qtype)
    if x2.shape[0] != 1 or int(qtype) not in _GEMV_IDS:
        raise ValueError(f"native GGUF gemv takes {'/'.join(t.name for t in GEMV_TYPES)} blocks "
                         "and one row")
    return registry.one_row("gemv", n, x2, portable, lib=lib, bias=bias, qtype=int(qtype),
                            blocks=blocks, n_blocks=groups, k=x2.shape[1])
