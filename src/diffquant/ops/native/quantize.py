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


def bnb4(w: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor, blocksize: int):
    """bf16 w (numel a multiple of ``blocksize``) -> (packed uint8 [numel / 2, 1], absmax float32
    [numel / blocksize]): bitsandbytes' 4-bit blocks, ``bounds`` (15 float32) and ``order`` (16
    uint8) its sorted code's midpoints and the code index of each bucket."""
    blocks = w.numel() // blocksize
    packed = torch.empty(w.numel() // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    registry.run("bnb4_quantize", blocks, w=w, bounds=bounds, order=order, blocksize=blocksize,
                 packed=packed, absmax=absmax, min_rows=256)
    return packed, absmax


def bnb_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """bf16 w [N, K] -> (int8 [N, K], float32 row absmax [N]): LLM.int8()'s rows of the fp16
    weight; None where a row's absmax is 0, inf or NaN (the reference's cast decides those)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scb = torch.empty(n, dtype=torch.float32)
    return (q, scb) if registry.run("bnb_int8_quantize", n, w=w, k=k, q=q, scb=scb,
                                    min_rows=16) else None


# the GGML types quantize_blocks.c writes -> their block bytes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
GGUF_TYPES = {2: 18, 3: 20, 6: 22, 7: 24, 8: 34}


def gguf(w: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """bf16 w (numel a multiple of 32) -> uint8 blocks [numel / 32, type size] of GGML type
    ``qtype`` (a GGUF_TYPES key); None where a block holds inf or NaN or its scale's inverse
    overflows, or a Q4_1 / Q5_1 block's minimum is a zero of both signs (the reference
    decides those)."""
    blocks = w.numel() // 32
    out = torch.empty(blocks, GGUF_TYPES[qtype], dtype=torch.uint8)
    return out if registry.run("gguf_quantize", blocks, qtype=qtype, w=w, out=out,
                               min_rows=256) else None


# the K-quants quantize_kquant.c writes -> their super-block bytes: Q4_K, Q5_K, Q6_K
KQUANT_TYPES = {12: 144, 13: 176, 14: 210}


_KQUANT_DTYPES = {torch.bfloat16: 0, torch.float32: 1, torch.float16: 2}  # quantize_kquant.c's


def kquant_supported(w: torch.Tensor) -> bool:
    """Whether quantize_kquant.c takes ``w``: contiguous bf16, float32 or float16 on the CPU,
    no autograd, a multiple of 256 values, the kernels built."""
    return w.dtype in _KQUANT_DTYPES and w.device.type == "cpu" \
        and w.is_contiguous() and not w.requires_grad and w.numel() % 256 == 0 \
        and build.available()


def gguf_kquant(w: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """bf16, float32 or float16 w (numel a multiple of 256) -> uint8 super-blocks [numel / 256, type
    size] of K-quant ``qtype`` (a KQUANT_TYPES key): ggml's quantize_row_q*_K_ref, the bytes of
    ops/formats/gguf_kquant.py; None where a super-block holds an inf or a NaN (the reference
    writes those)."""
    blocks = w.numel() // 256
    out = torch.empty(blocks, KQUANT_TYPES[qtype], dtype=torch.uint8)
    return out if registry.run("gguf_kquant", blocks, qtype=qtype, w=w,
                               dtype=_KQUANT_DTYPES[w.dtype], out=out, min_rows=8) else None
