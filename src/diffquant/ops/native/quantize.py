"""Weight quantization on load of bf16 rows through the C kernels (``csrc/quantize.c``): quanto's
int8 (absmax per row) and affine int4/int2 (min/max per group, quanto's packing), and torchao
int4's group-wise form; each the reference's bf16 ops (``ops/formats/quanto.py``,
``ops/formats/torchao.py``) bit for bit, one pass per row. ``ops/cpu/quantize.py`` calls them
where ``bf16_rows_supported``.

Example:
    >>> import torch
    >>> w = torch.randn(32, 64, dtype=torch.bfloat16)
    >>> if bf16_rows_supported(w):
    ...     q, scale = quanto_int8(w)
    ...     assert q.shape == (32, 64) and scale.shape == (32, 1)
"""

from __future__ import annotations

import torch

from . import build, registry


def bf16_rows_supported(w: torch.Tensor) -> bool:
    """Whether these kernels take ``w``: contiguous bf16 rows on the CPU, no autograd, the
    kernels built."""
    return w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() \
        and not w.requires_grad and build.available()


def quanto_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 w [N, K] -> (int8 codes [N, K], bf16 scale [N, 1]): quanto's absmax per row."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, 1, dtype=torch.bfloat16)
    registry.run("quanto_int8", n, w=w, k=k, q=q, scale=scale, min_rows=16)
    return q, scale


def quanto_affine(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 group rows w [R, g] -> (quanto's packing uint8 [ceil(R / (8 / bits)), g], bf16 scale
    and shift [R, 1]): quanto's min/max scale and shift per group row."""
    r, g = w.shape
    rows = -(-r // (8 // bits))                         # pack's rows
    packed = torch.empty(rows, g, dtype=torch.uint8)
    scale, shift = (torch.empty(r, 1, dtype=torch.bfloat16) for _ in range(2))
    registry.run("quanto_affine", rows, w=w, g=g, bits=bits, rows=r, packed=packed, scale=scale,
                 shift=shift, min_rows=8)
    return packed, scale, shift


def int4_groupwise(w: torch.Tensor, group_size: int):
    """bf16 w [N, K] -> (packed uint8 [N, K/2], scale, zero bf16 [N, K/g]): torchao int4's
    asymmetric groups with a float zero (an even group size)."""
    n, k = w.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale, zero = (torch.empty(n, k // group_size, dtype=w.dtype) for _ in range(2))
    registry.run("int4_groupwise", n, w=w, k=k, g=group_size, packed=packed, scale=scale,
                 zero=zero, min_rows=16)
    return packed, scale, zero
