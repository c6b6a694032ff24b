"""int8 dynamic quantization's CPU forward: per-token int8 activations x per-channel int8
weights, bit-identical to ``formats.torchao.int8_dynamic_linear``.

The activations are quantized in one pass and the int32 sums scaled back in one pass (the C
kernels of ``native/int8_dynamic.py`` for bf16 on a CPU; a few torch ops otherwise, with the same
bits). The integer product is the first of ``dispatch.INT8_DYNAMIC_PRODUCTS`` this machine runs:
AMX tiles (``native/int8_amx.py``); ``torch._int_mm`` where the CPU has VNNI; elsewhere (AVX2
only) the C dot product (one token: ``dispatch.ROUTES["torchao int8dq"].one_row``, all three
steps in one call), or float32 matmuls over 1024 columns at a time, whose sums are exact: the
same int32 sums either way.

Example:
    >>> import torch
    >>> from diffquant.ops.formats import torchao as iq
    >>> w = torch.randn(64, 128, dtype=torch.bfloat16)
    >>> q, s = iq.int8_quantize_per_channel(w)
    >>> x = torch.randn(5, 128, dtype=torch.bfloat16)
    >>> y = linear_int8_dynamic(x, prepare_int8_dynamic(q, s))
    >>> torch.equal(y, iq.int8_dynamic_linear(x, q, s))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import torchao as iq
from ..native import int8_amx as native_amx
from ..native import int8_dynamic as native_int8
from .dispatch import INT8_DYNAMIC_PRODUCTS, ROUTES
from .scratch import scratch_buffer

ONE_TOKEN = ROUTES["torchao int8dq"].one_row
AMX, INT_MM, INT8_DOT, _ = INT8_DYNAMIC_PRODUCTS  # the rest: exact float32 matmuls

_F32_EPS = torch.finfo(torch.float32).eps
# torch._int_mm slows down on wide outputs: at 1024-1280 tokens x 3072 inputs, 12288 output
# channels took 1.1-1.25x the bf16 product, in blocks of 3072 channels 0.7-0.8x (AMX Xeon, 2
# threads). So the product and the output scaling run a block of channels at a time, the sums
# in one reused int32 buffer.
_INT_MM_COLUMNS = 3072
# 1024 x 128 x 128 = 2**24: every partial sum of at most this many int8 x int8 products is an
# integer that float32 holds exactly, whatever the order of the sums
_EXACT_COLUMNS = 1024


# -- int8 dynamic: per-token int8 activations x per-channel int8 weights ---------------------------
@dataclass
class Int8DynamicWeight:
    """Weight of ``linear_int8_dynamic``: ``qt`` int8 [K, N] (a view of the stored [N, K]),
    ``scale`` float32 [N]."""

    qt: torch.Tensor
    scale: torch.Tensor


def prepare_int8_dynamic(qweight: torch.Tensor, scale: torch.Tensor) -> Int8DynamicWeight:
    """qweight int8 [N, K], scale [N] or [N, 1] float32 (torchao int8dq) -> Int8DynamicWeight."""
    return Int8DynamicWeight(qweight.t(), scale.reshape(-1).to(torch.float32))


def quantize_rows_int8(x2: torch.Tensor, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (int8 [M, K], float32 scale [M, 1]): torchao's per-token rule, bit for bit.

    amax / 127.5 is taken in x's dtype (as torchao); the product with 1/scale is in float32 and
    is rounded and clamped in place. With ``reuse`` the float32 temporary and the int8 result
    live in this thread's scratch buffers (valid until the next call).
    """
    m, k = x2.shape
    if reuse and native_int8.int8_supported(x2):  # one pass in C, the same bits
        q = scratch_buffer((m, k), torch.int8, x2.device, "act int8")
        done = native_int8.quantize_rows_bf16(x2, q)
        if done is not None:
            return done
    amax = torch.linalg.vector_norm(x2, float("inf"), dim=-1, keepdim=True)  # [M, 1], x dtype
    scale = torch.clamp(amax / 127.5, min=_F32_EPS).to(torch.float32)
    if not reuse:
        t = torch.mul(x2, 1.0 / scale)                                   # [M, K] float32
        return t.round_().clamp_(-128, 127).to(torch.int8), scale
    t = scratch_buffer((m, k), torch.float32, x2.device, "act f32")
    torch.mul(x2, 1.0 / scale, out=t)
    q = scratch_buffer((m, k), torch.int8, x2.device, "act int8")
    return q.copy_(t.round_().clamp_(-128, 127)), scale                 # exact integers: a cast


def linear_int8_dynamic(x: torch.Tensor, w: Int8DynamicWeight,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]: bit-identical to ``formats.torchao.int8_dynamic_linear``.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats import torchao as iq
        >>> q, s = iq.int8_quantize_per_channel(torch.randn(32, 64))
        >>> linear_int8_dynamic(torch.randn(3, 64), prepare_int8_dynamic(q, s)).shape
        torch.Size([3, 32])
    """
    k, n = w.qt.shape
    x2 = x.reshape(-1, k)                                                 # [M, K]
    if AMX.runs() and native_amx.amx_int8_supported(x2, w.qt.t()) \
            and (bias is None or bias.dtype == x.dtype):
        y = _linear_amx(x2, w, bias)
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
    y = _one_token(x2, w, bias)
    if y is not None:
        return y.reshape(*x.shape[:-1], n)
    xq, xs = quantize_rows_int8(x2, reuse=True)                           # [M, K], [M, 1]
    if x.device.type != "cpu":
        return _scale_output(iq.int8_mm(xq, w.qt), xs, w.scale, bias, x.dtype).reshape(
            *x.shape[:-1], n)                                             # int8_mm pads for CUDA
    m = x2.shape[0]
    native_out = native_int8.int8_supported(x) and (bias is None or bias.dtype == x.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    slow = not INT_MM.runs()
    columns = n if slow else _INT_MM_COLUMNS  # the slow-_int_mm products gain nothing by blocks
    for j0 in range(0, n, columns):
        j1 = min(n, j0 + columns)
        acc = scratch_buffer((m, j1 - j0), torch.int32, x.device, "act int32")
        if slow:
            _int8_mm_without_vnni(xq, w.qt, acc)
        else:
            torch._int_mm(xq, w.qt[:, j0:j1], out=acc)                   # [M, j1 - j0]
        b = None if bias is None else bias[j0:j1]
        if native_out:
            native_int8.int8_output_bf16(acc, xs, w.scale[j0:j1], b, out=y[:, j0:j1])
        else:
            y[:, j0:j1] = _scale_output(acc, xs, w.scale[j0:j1], b, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _one_token(x2: torch.Tensor, w: Int8DynamicWeight, bias) -> torch.Tensor | None:
    """One bf16 token where _int_mm is a generic loop: quantized, multiplied and scaled in one
    native call (the weight read once as a stream), or None (not this case, or a NaN/inf)."""
    if x2.shape[0] != 1 or not ONE_TOKEN.runs() or not native_int8.int8_supported(x2) \
            or not w.qt.t().is_contiguous() or (bias is not None and bias.dtype != x2.dtype):
        return None
    return native_int8.int8_dynamic_row(x2.contiguous(), w.qt.t(), w.scale, bias)


def _int8_mm_without_vnni(xq: torch.Tensor, qt: torch.Tensor, acc: torch.Tensor) -> None:
    """acc int32 [M, N] <- xq @ qt exactly where _int_mm is a generic loop: native's dot kernel
    (1280 tokens: 0.65x the float32 matmuls' time), else the exact float32 matmuls."""
    if INT8_DOT.runs() and qt.t().is_contiguous():
        xw = scratch_buffer(xq.shape, torch.int16, xq.device, "act int16")
        native_int8.int8_dot(xq, qt.t(), acc, xw)
    else:
        _int8_mm_float32(xq, qt, acc)


def _int8_mm_float32(xq: torch.Tensor, qt: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc int32 [M, N] <- xq int8 [M, K] @ qt int8 [K, N], exactly, with float32 matmuls:
    each over at most ``_EXACT_COLUMNS`` columns (exact sums), added in int32."""
    m, k = xq.shape
    n = qt.shape[1]
    xf = scratch_buffer((m, k), torch.float32, xq.device, "x f32").copy_(xq)
    wf = scratch_buffer((n, k), torch.float32, xq.device, "weight f32").copy_(qt.t())
    part = scratch_buffer((m, n), torch.float32, xq.device, "y f32")
    for k0 in range(0, k, _EXACT_COLUMNS):
        k1 = min(k, k0 + _EXACT_COLUMNS)
        torch.mm(xf[:, k0:k1], wf[:, k0:k1].t(), out=part)
        if k0 == 0:
            acc.copy_(part)                                               # integers: exact casts
        else:
            acc.add_(scratch_buffer((m, n), torch.int32, xq.device, "part int32").copy_(part))
    return acc


def _linear_amx(x2: torch.Tensor, w: Int8DynamicWeight,
                bias: torch.Tensor | None) -> torch.Tensor | None:
    """bf16 [M, K] -> bf16 [M, N] on AMX tiles (native/int8_amx.py: the stored weight read in place,
    the tokens quantized straight into the tiles' layout). None when a token holds a
    NaN or an infinity (the caller's path handles those)."""
    m, k = x2.shape
    # groups of 16 tokens, padded to whole tile pairs (32): the last pair's second tile is read
    xp = scratch_buffer(((m + 31) // 32 * 2, k // 4, 16, 4), torch.int8, x2.device, "act vnni")
    sx = native_amx.quantize_rows_vnni(x2, xp)
    if sx is None:
        return None
    return native_amx.amx_int8_linear(w.qt.t(), xp, m, sx, w.scale, bias)


def _scale_output(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int32 sums [M, N] -> dtype: the reference's roundings with torch ops."""
    y = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    torch.mul(acc, xs, out=y)                                             # float32 math, x dtype
    if dtype == torch.float32 or bias is None:
        y.mul_(ws)
        if bias is not None:
            y.add_(bias)
    else:  # reference: (y * scale) in float32, + bias, one rounding to x's dtype; not addcmul,
        # whose multiply-add is fused (one rounding fewer: a sum on a bf16 tie rounds the other way)
        y.copy_(torch.mul(y, ws).add_(bias))
    return y
