"""4-bit weights prepared for the CPU: torchao int4 (w = (u - 8) * scale + zero per group),
quanto's int4/int2 groups, and bitsandbytes' NF4/FP4 codes. torch's CPU int4pack kernel takes
the few-row products of every format of the form (u - 8) * scale + zero per group of 32 or
more columns (torchao int4, quanto int4, and GGUF Q4_0 / Q4_1 / Q4_K / Q8_0 / Q6_K mapped onto
it by ``gguf``), the C product of ``native/int4.py`` their one bf16 row where
``dispatch.INT4_GEMV`` runs; their routes in ``dispatch.ROUTES`` say what runs when.

Example:
    >>> import torch
    >>> codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    >>> run = int4_few_rows(32, 64, codes, torch.rand(32, 2) / 8, torch.zeros(32, 2))
    >>> run(torch.randn(1, 128, dtype=torch.bfloat16)).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..formats import quanto as qm
from ..formats import torchao as iq
from ..native import bnb4 as native_bnb4
from ..native import int4 as native_int4
from ..native import registry
from .dispatch import INT4_GEMV, ROUTES
from .linear import Packed, PreparedWeight, linear_decoded
from .scratch import chunk_rows, dequant_rows, scratch_buffer

LUT4 = ROUTES["bitsandbytes 4-bit"]


# -- torch's int4pack kernel, and the C one-row product ------------------------------------------
def pack_int4_cpu(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
    """codes [N, K] ints in [0, 15], scale/zero [N, K/group] float -> the int4pack kernel's inputs.

    Returns (packed uint8 [N', K/2], scales_and_zeros bf16 [K/group, N', 2]) with N padded to a
    multiple of 16 (zero codes and scales, sliced off after the matmul). The kernel takes its
    scales in the activations' dtype; bf16 is the usual one and the smallest to keep.
    """
    n, k = codes.shape
    pad = -n % 16
    codes = F.pad(codes.to(torch.int32), (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scale.float(), zero.float()], dim=-1)              # [N, G, 2]
    sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).to(torch.bfloat16).contiguous()
    return packed, sz                                                     # sz [G, N', 2]


def int4pack_matmul(n: int, group: int, packs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The packed CPU product for ``packs`` = [(packed, scales_and_zeros)], summed over packs.

    Scales are cast once per other activation dtype (the kernel wants them in x's dtype). Keep
    activations in bf16: the kernel's float16 variant is 20-100x slower on AVX-512 CPUs without
    FP16 arithmetic (measured at 3072x3072, 1-64 rows).
    """
    cast: dict = {packs[0][1].dtype: packs}

    def run(x2):                                                          # [M, K] -> [M, N]
        pieces = cast.get(x2.dtype)
        if pieces is None:
            pieces = cast[x2.dtype] = [(p, sz.to(x2.dtype)) for p, sz in packs]
        y = None
        for p, sz in pieces:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p, group, sz)
            y = part if y is None else y.add_(part)
        return y if y.shape[1] == n else y[:, :n].contiguous()

    return run


def int4_few_rows(n: int, group: int, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The few-row product of ``codes`` [N, K] in 0..15 with w = (u - 8) * scale + zero per
    ``group`` columns (scale/zero [N, K/group], rounded to bf16 as int4pack takes them).

    torch's int4pack kernel, except one bf16 row where ``dispatch.INT4_GEMV`` runs (C, on
    CPUs without AVX-512: there int4pack took 0.65-0.8x the bf16 product at one row, bound by
    its own arithmetic). Then the int4pack copy is made only if more rows come.
    """
    k = codes.shape[1]
    if codes.device.type != "cpu" or k % 32 or not native_int4.group_supported(k, group) \
            or not INT4_GEMV.runs():
        return int4pack_matmul(n, group, [pack_int4_cpu(codes, scale, zero, group)])
    packed, sz = native_int4.pack_rows(codes, scale, zero)
    int4pack = []

    def one_row(x2, bias):                                  # [1, K] -> [1, N], bias added
        if x2.dtype == torch.bfloat16 and x2.is_contiguous():
            return native_int4.gemv(packed, sz, group, x2, bias=bias)   # None: int4pack's
        return None

    def run(x2):                                                          # [M, K] -> [M, N]
        if x2.shape[0] == 1 and (y := one_row(x2, None)) is not None:
            return y
        if not int4pack:
            s, z = native_int4.scales(sz)
            int4pack.append(int4pack_matmul(
                n, group, [pack_int4_cpu(native_int4.unpack_rows(packed), s, z, group)]))
        return int4pack[0](x2)

    return Packed(run, one_row)  # PreparedWeight takes its one_row: the bias goes in the C call


# -- torchao int4 --------------------------------------------------------------------------------
def prepare_int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        lazy: bool = False) -> PreparedWeight:
    """torchao int4 (tinygemm numbers): packed uint8 [N, K/2] (column 2j in the low nibble),
    scale/zero [N, K/g] -> PreparedWeight with w = (u - 8) * scale + zero. ``lazy``: the packed
    kernel's copy (~0.6 B/weight) is made on the first few-row call, not now.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats import torchao as iq
        >>> p, s, z = iq.int4_quantize_groupwise(torch.randn(32, 128, dtype=torch.bfloat16), 64)
        >>> prepare_int4_weight(p, s, z).in_features
        128
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    groups = scale.shape[1]
    group = k // groups
    sdt = scale.dtype
    zero_s = zero.to(sdt).contiguous()

    def fill(r0, r1, t):                                                  # t [R, K] in scale dtype
        t.copy_(iq.int4_dequantize(packed[r0:r1], scale[r0:r1], zero_s[r0:r1], sdt))

    def dequant_into(out):                                                # out [N, K]
        if registry.bf16_weight_supported(out, packed, scale, zero_s):    # one pass in C
            native_int4.int4_tinygemm_into(packed, scale, zero_s, out)
        else:
            dequant_rows(out, sdt, fill)

    make = None
    if packed.device.type == "cpu" and group in (32, 64, 128, 256):
        def make():
            return int4_few_rows(n, group, iq.int4_unpack(packed), scale, zero)
    return PreparedWeight(ROUTES["torchao int4wo"], n, k, dequant_into, f"int4 g{group}",
                          packed.device, packed=None if lazy or make is None else make(),
                          make_packed=make if lazy else None)


# -- quanto int4 / int2 --------------------------------------------------------------------------
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
            native_int4.quanto_bits_into(packed, bits, scale, shift, out)  # one pass in C
        else:
            dequant_rows(out, sdt, fill)

    make = None
    if bits == 4 and g == 128 and sdt == torch.bfloat16 and packed.device.type == "cpu":
        def make():
            codes = qm.unpack(packed, bits, r_all).view(n, k)
            zero = (-shift) + 8 * scale                                   # bf16 math, as quanto
            return int4_few_rows(n, g, codes, scale.view(n, per), zero.view(n, per))

    route = ROUTES[f"quanto int{bits}"]
    return PreparedWeight(route, n, k, dequant_into, f"quanto int{bits} g{g}", packed.device,
                          make_packed=make, small_rows=route.few if make else 0)


# -- bitsandbytes NF4 / FP4 ----------------------------------------------------------------------
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
    if x.numel() == k and LUT4.one_row.runs():
        out = native_bnb4.lut4_gemv(packed, lut, absmax, blocksize, shape, x.reshape(1, k),
                                    bias=bias)
        return out.reshape(*x.shape[:-1], n)
    buf = scratch_buffer((n, k), x.dtype, x.device)
    return linear_decoded(x, native_bnb4.lut4_decode_into(packed, lut, absmax, blocksize, buf),
                          bias)


def lut4_runs_here() -> bool:
    """Whether ``linear_lut4`` runs here (the C kernels are built): else the layer keeps
    bitsandbytes' own forward."""
    return LUT4.decode.runs()
