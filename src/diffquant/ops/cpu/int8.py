"""More stored layouts -> ``fast_linear.PreparedWeight``: row-scaled 8-bit weights whose
reference multiplies the scale into the weight (quanto int8/float8, modelopt INT8/FP8, torchao
float8), and quanto's bit-packed int4/int2 groups; and bitsandbytes' 4-bit forward
(``linear_lut4``).

Each dequantize path repeats its reference's float ops in the reference's dtype, chunk by chunk,
so the weight it writes is bit-identical; the packed few-row kernels are held to bf16 rounding.

Example:
    >>> import torch
    >>> from diffquant.ops.cpu.linear import linear_weight_only
    >>> q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    >>> w = prepare_row_scaled(q, torch.rand(32, 1, dtype=torch.bfloat16))
    >>> linear_weight_only(torch.randn(3, 64, dtype=torch.bfloat16), w).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch

from ..formats import quanto as qm
from ..native import bnb4 as native_bnb4
from ..native import int4 as native_int4
from ..native import int8_weight as native_int8w
from ..native import registry
from .int4 import int4_few_rows
from .linear import INT4_SMALL_ROWS, SMALL_ROWS, PreparedWeight, _aligned, linear_decoded
from .scratch import chunk_rows, dequant_rows, scratch_buffer


def prepare_row_scaled(q: torch.Tensor, scale: torch.Tensor,
                       small_rows: int = SMALL_ROWS) -> PreparedWeight:
    """q int8 or float8 [N, K], scale [N, 1] or one value, of the reference's math dtype ->
    w = q.to(scale.dtype) * scale, as quanto (``weight._scale * weight._data``) and modelopt
    (``q.to(dtype) * scale.to(dtype)``) compute it.

    int8 with K % 16 == 0 also gets the packed kernel quanto itself calls for bf16 activations,
    ``torch._weight_int8pack_mm(x, q, scale)`` (scale in x's dtype).
    """
    n, k = q.shape
    sdt = scale.dtype
    rows_scale = scale.reshape(-1, 1) if scale.numel() == n else None     # [N, 1] or None
    one = None if rows_scale is not None else scale.reshape(())          # per-tensor scale

    def fill(r0, r1, t):                                                  # t [R, K] in sdt
        t.copy_(q[r0:r1])
        t.mul_(rows_scale[r0:r1] if rows_scale is not None else one)

    flat_scale = scale.reshape(-1).contiguous()

    def dequant_into(out):                                                # out [N, K]
        if q.dtype == torch.int8 and registry.bf16_weight_supported(out, q, flat_scale):
            native_int8w.int8_rows_into(q, flat_scale, out)                     # one pass in C
        else:
            dequant_rows(out, sdt, fill)

    packed = one_row = None
    if q.dtype == torch.int8 and q.device.type == "cpu" and k % 16 == 0:
        per_row = scale.reshape(-1).expand(n)                             # [N]
        cast: dict = {}

        def scale_in(dtype):
            s = cast.get(dtype)
            if s is None:
                s = cast[dtype] = per_row.to(dtype).contiguous()
            return s

        def packed(x2):                                                   # [M, K] -> [M, N]
            return torch._weight_int8pack_mm(x2, _aligned(q), scale_in(x2.dtype))

        def one_row(x2, bias):  # in C: int8pack's numbers, then + bias rounded (quanto's order)
            if not native_int8w.int8_gemv_supported(q, x2) or (bias is not None
                                                          and bias.dtype != x2.dtype):
                return None
            return native_int8w.int8_gemv(q, scale_in(x2.dtype), x2, bias=bias)

    return PreparedWeight(n, k, dequant_into, None, packed, small_rows, f"{q.dtype} row-scaled",
                          q.device, one_row=one_row)


def prepare_quanto_bits(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int,
                        shape: tuple[int, int]) -> PreparedWeight:
    """quanto int4/int2 -> PreparedWeight; w = scale * code - shift per group, as quanto.

    The weight [N, K] is R = N*K/g groups of g columns (``scale``/``shift`` [R, 1]); group row
    i + j*P sits in bits j*bits.. of byte row i of ``packed`` [P, g] (quanto's packing along
    dim 0).

    Few rows, int4 in groups of 128 with bf16 scales on a CPU: the int4pack kernel with
    zero = 8 * scale - shift rounded to bf16, which is exactly what quanto's own layer runs there
    (its ``TinyGemmWeightQBitsTensor``, at every row count): the same outputs as quanto's,
    within bf16 rounding of the dequantize path. Other groups, int2 and float16/32 scales have
    no such layer in quanto; they always dequantize. The packed copy is made on the first
    few-row call.
    """
    n, k = shape
    r_all = scale.shape[0]
    g = n * k // r_all                                                    # group size
    per = r_all // n                                                      # groups per row
    mask, p = (1 << bits) - 1, packed.shape[0]
    sdt = scale.dtype

    def fill(r0, r1, t):                                                  # t [R, K] in sdt
        a, b = r0 * per, r1 * per                                         # group rows a:b
        tv = t.view(b - a, g)
        most = chunk_rows(n, k, sdt, t.device) * per
        codes = scratch_buffer((most, g), torch.uint8, t.device, "quanto codes")
        for j in range(8 // bits):
            lo, hi = max(a, j * p), min(b, (j + 1) * p)
            if lo >= hi:
                continue
            c = codes[: hi - lo]
            torch.bitwise_right_shift(packed[lo - j * p: hi - j * p], bits * j, out=c)
            tv[lo - a: hi - a].copy_(c.bitwise_and_(mask))
        tv.mul_(scale[a:b]).sub_(shift[a:b])                              # quanto's op order

    def dequant_into(out):                                                # out [N, K]
        if out.is_contiguous() and registry.bf16_weight_supported(out, packed, scale, shift):
            native_int4.quanto_bits_into(packed, bits, scale, shift, out)      # one pass in C
        else:
            dequant_rows(out, sdt, fill)

    make = None
    if bits == 4 and g == 128 and sdt == torch.bfloat16 and packed.device.type == "cpu":
        def make():
            codes = qm.unpack(packed, bits, r_all).view(n, k)
            zero = (-shift) + 8 * scale                                   # bf16 math, as quanto
            return int4_few_rows(n, g, codes, scale.view(n, per), zero.view(n, per))

    return PreparedWeight(n, k, dequant_into, None, None, INT4_SMALL_ROWS if make else 0,
                          f"quanto int{bits} g{g}", packed.device, make)


def linear_lut4(x: torch.Tensor, packed: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor,
                blocksize: int, shape: tuple[int, int], bias: torch.Tensor | None) -> torch.Tensor:
    """bitsandbytes NF4/FP4 linear for bf16 ``x`` [..., K] on a CPU with the C kernels: ``lut``
    the 16 code values, ``absmax`` float32 per block (double quantization expanded).

    One row: a product that reads the codes in place (bitsandbytes' own CPU kernel is ~8x the
    bf16 product, this one below 1x; within bf16 rounding). More rows: bitsandbytes'
    dequantization, bit for bit, into the layers' shared buffer (it allocates a fresh weight
    each call), then the same matmul: bitsandbytes' numbers.
    """
    n, k = shape
    if x.numel() == k:
        out = native_bnb4.lut4_gemv(packed, lut, absmax, blocksize, shape, x.reshape(1, k), bias=bias)
        return out.reshape(*x.shape[:-1], n)
    buf = scratch_buffer((n, k), x.dtype, x.device)
    return linear_decoded(x, native_bnb4.lut4_decode_into(packed, lut, absmax, blocksize, buf), bias)
