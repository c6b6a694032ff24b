"""Integer and float8 weight formats as plain functions over tensors (torchao's numerics).

Every function reproduces torchao 0.18's own primitives step by step, dtype by dtype, so a
weight quantized here holds the same integers and scales as ``torchao.quantization.quantize_``
gives (tests/test_torchao.py checks it):

- int8 per channel, symmetric: ``Int8Tensor.from_hp(w, PerRow())`` (scale = amax / 127.5,
  computed in the weight's dtype, stored as float32 ``[out, 1]``);
- int8 per token activations, the same rule along the last dim of ``x``;
- int4 group-wise, asymmetric with a float zero (the "tinygemm" convention of
  ``Int4WeightOnlyConfig``): ``w ~= (q - 8) * scale + zero`` with q in [0, 15];
- float8 per channel: ``Float8Tensor.from_hp(w, PerRow())`` (scale = amax / finfo.max).

Example:
    >>> import torch
    >>> w = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> q, s = int8_quantize_per_channel(w)
    >>> (int8_dequantize(q, s, torch.bfloat16) - w).abs().max() < 0.05
    tensor(True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_F32_EPS = torch.finfo(torch.float32).eps  # torchao uses float32's eps for int8 whatever the dtype


# -- int8, symmetric, one scale per row -----------------------------------------------------
_CHUNK = 1 << 20  # elements per float32 chunk of the 2-d path: 4 MB, stays in the caches


def int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] float -> (q int8 [..., K], scale float32 [..., 1]), one scale per row."""
    if w.dim() == 2 and w.numel() > _CHUNK and w.device.type == "cpu":
        return _int8_quantize_rows_chunked(w)
    amax = w.abs().amax(dim=-1, keepdim=True)           # [..., 1] in w.dtype, as torchao
    scale = torch.clamp(amax / 127.5, min=_F32_EPS).to(torch.float32)
    q = torch.clamp(torch.round(w * (1.0 / scale)), -128, 127).to(torch.int8)
    return q, scale


def _int8_quantize_rows_chunked(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same numbers for a big weight [N, K] on a CPU, without its float32 copies.

    The one-line form makes four whole-weight temporaries (|w|, then w * (1 / scale) in float32,
    rounded, clamped: ~13 B/weight) and its mixed-dtype product is not vectorised. Here the rows
    run through one float32 chunk: a plain cast, then single-dtype ops in place, then a cast.
    """
    n, k = w.shape
    # max |w| per row, exact; two reductions without an |w| copy beat vector_norm(inf) 4x
    amax = torch.maximum(w.amax(dim=-1, keepdim=True), w.amin(dim=-1, keepdim=True).neg_())
    scale = torch.clamp(amax / 127.5, min=_F32_EPS).to(torch.float32)       # [N, 1]
    inv = 1.0 / scale
    q = torch.empty(n, k, dtype=torch.int8)
    rows = max(1, _CHUNK // k)
    t = torch.empty(min(rows, n), k, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        c = t[: r1 - r0]
        c.copy_(w[r0:r1])                               # exact widening
        c.mul_(inv[r0:r1]).round_().clamp_(-128, 127)
        q[r0:r1].copy_(c)                               # exact integers
    return q, scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 [..., K], scale float32 [..., 1] -> [..., K] in ``dtype``."""
    return (q.to(dtype) * scale).to(dtype)


def int8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [..., K] -> (q int8 [..., K], scale float32 [..., 1])."""
    return int8_quantize_per_channel(x)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a [M, K] int8 @ b [K, N] int8 -> int32 [M, N] with ``torch._int_mm``.

    CUDA's kernel wants M > 16 and K, N multiples of 8; zero padding keeps the result exact.
    """
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), -k % 8, -n % 8
    if pm or pk or pn:
        a = F.pad(a, (0, pk, 0, pm))
        b = F.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b.contiguous())[:m, :n]


def int8_weight_only_linear(x, q, scale, bias=None):
    """x [..., K] @ dequant(q [N, K]).T: torchao's weight-only int8 path, op for op."""
    m = torch.mm(x.reshape(-1, x.shape[-1]), q.t().to(x.dtype))      # [M, N]
    y = (m * scale.to(m.dtype).flatten()).reshape(*x.shape[:-1], q.shape[0])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def int8_dynamic_linear(x, q, scale, bias=None):
    """Per-token int8 activations x int8 weights q [N, K], integer matmul, then both scales."""
    xq, xs = int8_quantize_per_token(x)                               # [..., K], [..., 1]
    acc = int8_mm(xq.reshape(-1, x.shape[-1]), q.t())                 # int32 [M, N]
    y = (acc.to(torch.float32) * xs.reshape(-1, 1)).to(x.dtype)       # per-token scale
    y = (y * scale.flatten()).reshape(*x.shape[:-1], q.shape[0])      # per-channel scale, fp32
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


# -- int4, asymmetric with float zero, one (scale, zero) per group of columns -------------------
def int4_quantize_groupwise(w: torch.Tensor, group_size: int):
    """w [N, K] float -> (packed uint8 [N, K/2], scale [N, K/g], zero [N, K/g]) in w.dtype."""
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"int4 group-wise quantization: in_features={k} is not a multiple of "
                         f"group_size={group_size}")
    g = w.reshape(n, k // group_size, group_size)                     # [N, G, g]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                           # [N, G] in w.dtype
    eps = torch.finfo(w.dtype).smallest_normal
    scale = torch.clamp((hi - lo) / 15.0, min=eps).to(w.dtype)
    zero = (lo + scale * 8.0).to(w.dtype)
    min_val = (zero - scale * 8.0).unsqueeze(-1)
    q = torch.clamp(torch.round((g - min_val) / scale.unsqueeze(-1)), 0, 15)
    return int4_pack(q.reshape(n, k).to(torch.uint8)), scale, zero


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in [0, 15] -> uint8 [N, K/2]; column 2j in the low nibble, 2j+1 high."""
    return q[:, ::2] | (q[:, 1::2] << 4)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in [0, 15]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def int4_dequantize(packed, scale, zero, dtype: torch.dtype) -> torch.Tensor:
    """(packed [N, K/2], scale/zero [N, G]) -> [N, K] in ``dtype``: (q - 8) * scale + zero."""
    q = int4_unpack(packed)
    n, k = q.shape
    g = q.reshape(n, scale.shape[1], -1)                              # [N, G, g]
    w = (g - 8.0).to(dtype) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


# -- float8, symmetric, one scale per row --------------------------------------------------------
def float8_quantize_per_channel(w: torch.Tensor, fp8_dtype=torch.float8_e4m3fn):
    """w [..., K] -> (q ``fp8_dtype`` [..., K], scale float32 [..., 1])."""
    fmax = torch.finfo(fp8_dtype).max
    scale = (w.abs().amax(dim=-1, keepdim=True) / fmax).to(torch.float32)  # amax in w.dtype
    # torchao divides 0 by 0 for an all-zero row (NaN weights); a scale of 1 stores exact zeros.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (w.to(torch.float32) / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale


def float8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q float8 [..., K], scale float32 [..., 1] -> [..., K] in ``dtype``."""
    return (q.to(torch.float32) * scale).to(dtype)


def float8_weight_only_linear(x, q, scale, bias=None):
    """torchao's float8 weight-only path: dequantize, matmul in x's dtype, add bias."""
    y = torch.matmul(x, float8_dequantize(q, scale, x.dtype).t())
    return y + bias if bias is not None else y
