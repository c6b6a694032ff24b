"""4-bit weights prepared for the CPU: torchao int4 (w = (u - 8) * scale + zero per group),
quanto's int4/int2 groups, and bitsandbytes' NF4/FP4 codes, each keeping only its stored
pieces (no prepared copy in another layout): more than one row decodes into the shared buffer,
one bf16 row of torchao int4 goes to the C product of ``native/int4.py`` where
``dispatch.INT4_GEMV`` runs. Their routes in ``dispatch.ROUTES`` say what runs when.
``pack_int4_cpu`` / ``int4pack_matmul`` (torch's int4pack kernel) are the tests' and the
benchmarks' reference for the C product.

Example:
    >>> import torch
    >>> codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    >>> run = int4pack_matmul(32, 64, [pack_int4_cpu(codes, torch.rand(32, 2) / 8,
    ...                                              torch.zeros(32, 2), 64)])
    >>> run(torch.randn(1, 128, dtype=torch.bfloat16)).shape
    torch.Size([1, 32])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..formats import torchao as iq
from ..native import bnb4 as native_bnb4
from ..native import int4 as native_int4
from ..native import registry
from .dispatch import INT4_GEMV, ROUTES
from .linear import PreparedWeight, linear_decoded
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


# -- torchao int4 --------------------------------------------------------------------------------
def prepare_int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        lazy: bool = False) -> PreparedWeight:
    """torchao int4 (tinygemm numbers): packed uint8 [N, K/2] (column 2j in the low nibble),
    scale/zero [N, K/g] -> PreparedWeight with w = (u - 8) * scale + zero. It keeps nothing
    but the stored pieces: one bf16 row goes to the C product where ``dispatch.INT4_GEMV`` runs
    (its layout made per call in the shared buffer: ``_row_form``), more rows decode. ``lazy``
    is accepted for the other ``prepare_*`` functions' signature.

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

    one_row = None
    if packed.device.type == "cpu" and k % 32 == 0 and native_int4.group_supported(k, group) \
            and INT4_GEMV.runs():
        def one_row(x2, bias):                              # [1, K] -> [1, N], bias added
            if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
                return None
            p, sz = _row_form(packed, scale, zero)
            return native_int4.gemv(p, sz, group, x2, bias=bias)     # None: it decodes
    return PreparedWeight(ROUTES["torchao int4wo"], n, k, dequant_into, f"int4 g{group}",
                          packed.device, one_row=one_row)


def _row_form(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """torchao int4's stored pieces in ``native_int4.pack_rows``' layout, built per call in the
    shared scratch buffer (one pass over the 0.5 B/weight codes, ~the cost of the product it
    feeds) instead of a kept copy: the codes are torchao's but for the sign bit of the last of
    every 8 (bit 31 of each little-endian 32-bit word), and scale and zero are interleaved."""
    n, half = packed.shape
    p = scratch_buffer((n, half), torch.uint8, packed.device, "int4 row codes")
    torch.bitwise_xor(packed.view(torch.int32), -(1 << 31), out=p.view(torch.int32))
    groups = scale.shape[1]
    sz = scratch_buffer((n, groups), torch.int32, packed.device, "int4 row scales")
    pairs = sz.view(torch.bfloat16).view(n, groups, 2)
    pairs[..., 0].copy_(scale)
    pairs[..., 1].copy_(zero)
    return p, sz


# -- quanto int4 / int2 --------------------------------------------------------------------------
def prepare_quanto_bits(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int,
                        shape: tuple[int, int]) -> PreparedWeight:
    """quanto int4/int2 -> PreparedWeight; w = scale * code - shift per group, as quanto.

    The weight [N, K] is R = N*K/g groups of g columns (``scale``/``shift`` [R, 1]); group row
    i + j*P sits in bits j*bits.. of byte row i of ``packed`` [P, g] (quanto's packing along
    dim 0).

    Every row count decodes (C, else quanto's torch ops) into the shared buffer: the layer
    keeps only its stored pieces. (quanto's own int4 layer on a CPU keeps torch's int4pack form
    instead of these pieces; its outputs are within bf16 rounding of these.)
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

    route = ROUTES[f"quanto int{bits}"]
    return PreparedWeight(route, n, k, dequant_into, f"quanto int{bits} g{g}", packed.device,
                          small_rows=0)


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


def lut4_tables(state) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``linear_lut4``'s tables from a bitsandbytes QuantState: (the 16 code values, absmax per
    block) in float32, the stored tensors themselves where they are float32 already. With double
    quantization absmax is None: its expansion (one float32 per 64 weights, 12% of an NF4 layer)
    is made per call (``lut4_absmax``), as bitsandbytes' own dequantize_4bit does, so a layer
    that keeps these tables holds only its stored pieces."""
    return state.code.float().contiguous(), None if state.nested else lut4_absmax(state)


def lut4_absmax(state) -> torch.Tensor:
    """absmax per block in float32, as bitsandbytes' dequantize_4bit expands it
    (double-quantized statistics decoded, plus their offset)."""
    absmax = state.absmax
    if state.nested:
        from bitsandbytes.functional import dequantize_blockwise  # only a nested state needs it

        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float().contiguous()
