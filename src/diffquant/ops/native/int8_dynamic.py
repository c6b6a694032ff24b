"""int8 dynamic quantization through the C kernels (``csrc/int8_dynamic.c``): the tokens'
quantization, the int32 sums scaled back to bf16, the integer product where ``torch._int_mm`` is
a generic loop, and one token through all three in one call. ``ops/cpu/int8_dynamic.py`` and
``ops/cpu/quantize.py`` use them on bf16 CPU tensors; the AMX product is ``int8_amx``'s."""

from __future__ import annotations

import torch

from . import build, registry


def int8_supported(x: torch.Tensor) -> bool:
    """Whether ``quantize_rows_bf16`` / ``int8_output_bf16`` take activations like ``x``."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and build.available()


def quantize_rows_bf16(x2: torch.Tensor, q: torch.Tensor):
    """x bf16 [M, K] (unit column stride) -> (q filled: int8 [M, K], scale float32 [M, 1]), the
    per-token rule of ``formats.torchao.int8_quantize_per_token`` bit for bit; None when a row holds
    an infinity or a NaN (use the torch ops)."""
    m, k = x2.shape
    if x2.stride(1) != 1 or not q.is_contiguous() or q.shape != (m, k):
        raise ValueError("native int8 quantize: x needs unit column stride, q [M, K] contiguous")
    scale = torch.empty(m, 1, dtype=torch.float32)
    if not registry.run("quantize", m, x=x2, ldx=x2.stride(0), k=k, q=q, scale=scale):
        return None
    return q, scale


def int8_output_bf16(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
                     bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [M, N] sums -> bf16 [M, N]: token scale, then channel scale and bias, with
    ``formats.torchao.int8_dynamic_linear``'s roundings. ``out``: bf16 [M, N] whose rows are
    contiguous (a block of columns of a wider output may be), returned."""
    m, n = acc.shape
    y = torch.empty(m, n, dtype=torch.bfloat16) if out is None else out
    acc, sx, sw = acc.contiguous(), sx.reshape(m).contiguous(), sw.reshape(n).contiguous()
    if sx.dtype != torch.float32 or sw.dtype != torch.float32 or acc.dtype != torch.int32 or (
            bias is not None and bias.dtype != torch.bfloat16):
        raise ValueError("native int8 output: int32 sums, float32 scales, bf16 bias")
    if y.dtype != torch.bfloat16 or y.shape != (m, n) or (n > 1 and y.stride(1) != 1):
        raise ValueError(f"native int8 output: out must be bf16 [{m}, {n}] with contiguous "
                         f"rows, got {y.dtype} {tuple(y.shape)} strides {y.stride()}")
    b = None if bias is None else bias.contiguous()
    registry.run("int8_output", m, acc=acc, sx=sx, sw=sw, bias=b, n=n, y=y, ldy=y.stride(0))
    return y


def int8_dot(xq: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
             xw: torch.Tensor | None = None) -> torch.Tensor:
    """int8 xq [M, K] @ (int8 q [N, K]).T -> out int32 [M, N] (rows contiguous), exactly:
    ``torch._int_mm``'s sums, each weight row read once per four tokens. ``xw``: an int16
    [M, K] buffer for the widened tokens (a fresh one if None)."""
    m, k = xq.shape
    n = q.shape[0]
    if xq.dtype != torch.int8 or q.dtype != torch.int8 or q.shape[1] != k or not q.is_contiguous() \
            or out.dtype != torch.int32 or out.shape != (m, n) or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"native int8 dot: expected int8 x [M, {k}], contiguous int8 q [N, {k}], "
                         f"int32 out [{m}, {n}] with contiguous rows")
    if xw is None or xw.shape != (m, k) or xw.dtype != torch.int16 or not xw.is_contiguous():
        xw = torch.empty(m, k, dtype=torch.int16)
    xw.copy_(xq)                                                          # widened once
    registry.run("int8_dot", n, xw=xw, m=m, q=q, k=k, acc=out, ldacc=out.stride(0))
    return out


def int8_dynamic_row(x2: torch.Tensor, q: torch.Tensor, sw: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor | None:
    """One bf16 token x2 [1, K] through int8 dynamic with int8 weight q [N, K] and float32
    channel scales ``sw`` [N] -> bf16 [1, N], in one call: quantized, multiplied in int32 and
    scaled as ``quantize_rows_bf16``, ``int8_dot`` and ``int8_output_bf16`` do in three (whose
    Python around them cost ~15% of a 3072 x 3072 layer). None when the token holds an
    infinity or a NaN, or the kernel found no memory for the token's codes (use those)."""
    n, k = q.shape
    if x2.shape != (1, k) or x2.dtype != torch.bfloat16 or not x2.is_contiguous() \
            or q.dtype != torch.int8 or not q.is_contiguous() or sw.dtype != torch.float32 \
            or sw.numel() != n or (bias is not None and (bias.dtype != torch.bfloat16
                                                        or bias.numel() != n)):
        raise ValueError(f"native int8 dynamic row: expected contiguous bf16 x [1, {k}], int8 q "
                         f"[{n}, {k}], float32 channel scales [{n}], bf16 bias [{n}] or none")
    sw = sw.reshape(n).contiguous()
    b = None if bias is None else bias.reshape(n).contiguous()
    y = torch.empty(1, n, dtype=torch.bfloat16)
    if not registry.run("int8_dynamic_row", n, x=x2, k=k, q=q, sw=sw, bias=b, y=y):
        return None
    return y
