"""GGUF (ggml) block formats as pure torch functions: dequantize every common type, quantize some.

A GGUF tensor of logical shape (..., n) is stored row by row as ``n // block_size`` blocks of
``type_size`` bytes, so its bytes form a uint8 tensor of shape (..., n // block_size * type_size).
Every function here works on whole tensors at once (no Python loop over blocks) and computes
in float32, exactly as gguf-py's numpy reference does, so results match it bit for bit; the
cast to the caller's dtype comes last.

The bit layouts follow ggml (``ggml-quants.c``) through gguf-py's ``quants.py`` and City96's
torch port used by diffusers.

Example:
    >>> import torch
    >>> from diffquant.ops.formats.gguf import GGMLType, quantize, dequantize
    >>> w = torch.randn(4, 64)
    >>> blocks = quantize(w, GGMLType.Q8_0)          # (4, 68) uint8: 2 blocks of 34 bytes per row
    >>> (dequantize(blocks, GGMLType.Q8_0) - w).abs().max() < 0.05
    tensor(True)
"""

from __future__ import annotations

from enum import IntEnum

import torch

from ...errors import QuantizationError
from .gguf_kquant import kquant_blocks

QK_K = 256  # super-block size of the K-quants


class GGMLType(IntEnum):
    """GGML tensor type ids as written in GGUF files (the subset diffquant reads)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# type -> (elements per block, bytes per block)
BLOCK_LAYOUT = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210),
}
FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16,
               GGMLType.BF16: torch.bfloat16}


def ggml_type(qtype) -> GGMLType:
    """``GGMLType`` of an int id or a name such as ``"Q4_K"``; a clear error for anything else."""
    try:
        return GGMLType[qtype.upper()] if isinstance(qtype, str) else GGMLType(int(qtype))
    except (KeyError, ValueError, TypeError):
        names = ", ".join(t.name for t in GGMLType)
        raise QuantizationError(f"GGUF type {qtype!r} is not supported; expected one of {names}") \
            from None


def byte_shape(shape, qtype) -> tuple[int, ...]:
    """Logical shape (..., n) -> shape of its uint8 blocks (..., n // block_size * type_size)."""
    block, size = BLOCK_LAYOUT[ggml_type(qtype)]
    if shape[-1] % block:
        raise QuantizationError(f"GGUF {ggml_type(qtype).name}: row length {shape[-1]} is not a "
                                f"multiple of the block size {block}")
    return (*shape[:-1], shape[-1] // block * size)


def logical_shape(bshape, qtype) -> tuple[int, ...]:
    """Shape of uint8 blocks (..., nbytes) -> the logical shape they decode to."""
    block, size = BLOCK_LAYOUT[ggml_type(qtype)]
    if bshape[-1] % size:
        raise QuantizationError(f"GGUF {ggml_type(qtype).name}: {bshape[-1]} bytes per row is not "
                                f"a multiple of the block size {size} bytes")
    return (*bshape[:-1], bshape[-1] // size * block)


# -- bit helpers ------------------------------------------------------------------------------
def half_floats(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian half-float bytes (any strides) -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).float()


_f16 = half_floats  # the short name of the block decoders below


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) little-endian bytes -> (n, 1) int64 (the qh bit masks of Q5_0/Q5_1)."""
    b = b.to(torch.int64)
    return (b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24).unsqueeze(1)


def _bits(x: torch.Tensor, group: int, shifts, mask: int) -> torch.Tensor:
    """ggml's packing order: for each run of ``group`` bytes, the ``mask`` bits at each shift.

    (n, m) uint8 -> (n, m * len(shifts)) uint8
    """
    n = x.shape[0]
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(1, 1, -1, 1)
    return ((x.reshape(n, -1, 1, group) >> s) & mask).reshape(n, -1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes hold eight 6-bit scales and eight 6-bit mins. (n, 12) -> 2 x (n, 8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


# -- dequantize: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ---------------
def _dq_q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _dq_q4_0(b):
    return _f16(b[:, :2]) * (_bits(b[:, 2:], 16, (0, 4), 0x0F).float() - 8)


def _dq_q4_1(b):
    return _f16(b[:, :2]) * _bits(b[:, 4:], 16, (0, 4), 0x0F).float() + _f16(b[:, 2:4])


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes of high bits + 16 bytes of nibbles -> (n, 32) values 0..31."""
    high = (_u32(qh) >> torch.arange(32, device=qh.device)) & 1           # (n, 32)
    return (_bits(qs, 16, (0, 4), 0x0F).to(torch.int64) | (high << 4)).float()


def _dq_q5_0(b):
    return _f16(b[:, :2]) * (_q5_values(b[:, 2:6], b[:, 6:]) - 16)


def _dq_q5_1(b):
    return _f16(b[:, :2]) * _q5_values(b[:, 4:8], b[:, 8:]) + _f16(b[:, 2:4])


def _dq_q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], 8, (0, 4), 0x0F)                          # (n, 16)
    high = _bits(scales[:, 8:], 4, (0, 2, 4, 6), 0x03)                   # (n, 16)
    dl = (d * ((low | (high << 4)).float() - 32)).reshape(n, 16, 1)
    ql = _bits(qs, 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    qh = _bits(hmask, 32, tuple(range(8)), 1).reshape(n, 16, 16)
    q = ql - ((qh ^ 1) << 2).float()  # a clear high bit means "subtract 4"
    return (dl * q).reshape(n, QK_K)


def q4_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K blocks (n, 144) -> (d * scale, dmin * min) float32 (n, 8), per 32-value sub-block:
    the weight is d * scale * q - dmin * min (ops/cpu/gguf.py maps it onto int4pack)."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return d * sc, dmin * mn


def _dq_q4_k(b):
    n = b.shape[0]
    ds, dm = q4_k_scales(b)
    q = _bits(b[:, 16:], 32, (0, 4), 0x0F).reshape(n, 8, 32).float()
    return (ds.reshape(n, 8, 1) * q - dm.reshape(n, 8, 1)).reshape(n, QK_K)


def _dq_q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    ql = _bits(b[:, 48:], 32, (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 32, tuple(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def q6_k_codes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks (n, 210) -> (codes uint8 (n, 256) in 0..63, in element order; d * the int8
    sub-block scales, float32 (n, 16)): the weight is scale * (code - 32), 16 values a scale
    (ops/cpu/gguf.py maps it onto int4pack)."""
    low = _bits(b[:, :128], 64, (0, 4), 0x0F)
    high = _bits(b[:, 128:192], 32, (0, 2, 4, 6), 0x03)
    return low | (high << 4), _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()


def _dq_q6_k(b):
    n = b.shape[0]
    codes, dl = q6_k_codes(b)
    q = (codes.float() - 32).reshape(n, 16, 16)
    return (dl.reshape(n, 16, 1) * q).reshape(n, QK_K)


_DEQUANT = {
    GGMLType.Q8_0: _dq_q8_0, GGMLType.Q4_0: _dq_q4_0, GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0, GGMLType.Q5_1: _dq_q5_1, GGMLType.Q2_K: _dq_q2_k,
    GGMLType.Q3_K: _dq_q3_k, GGMLType.Q4_K: _dq_q4_k, GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}


def dequantize(data: torch.Tensor, qtype, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks (..., nbytes) of GGUF type ``qtype`` -> values (..., n) in ``dtype``."""
    qtype = ggml_type(qtype)
    if data.dtype != torch.uint8:
        raise QuantizationError(f"GGUF {qtype.name} dequantize: expected uint8 blocks, got {data.dtype}")
    shape = logical_shape(tuple(data.shape), qtype)
    data = data.contiguous()
    if qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[qtype]).to(dtype)
    blocks = data.reshape(-1, BLOCK_LAYOUT[qtype][1])                      # (n_blocks, type_size)
    return _DEQUANT[qtype](blocks).reshape(shape).to(dtype)


# -- quantize: (n_blocks, block_size) float32 -> (n_blocks, type_size) uint8 -----------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) bytes of the half float (round to nearest even, as numpy)."""
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values -> (n, 16) bytes: element i in the low nibble, i + 16 in the high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit values -> (n, 4) little-endian bytes of a mask whose bit i is q[i] >> 4."""
    mask = (((q.to(torch.int64) >> 4) & 1) << torch.arange(32, device=q.device)).sum(-1, keepdim=True)
    return ((mask >> torch.tensor([0, 8, 16, 24], device=q.device)) & 0xFF).to(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's roundf (torch.round rounds half to even)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _absmax_signed(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of each block, sign kept (first one on ties). (n, 1)"""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def _q_q8_0(x):
    d = x.abs().amax(-1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=-1)


def _q_q4_0(x):
    d = _absmax_signed(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=-1)


def _q_q4_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=-1)


def _q_q5_0(x):
    d = _absmax_signed(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


def _q_q5_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q)], dim=-1)


_QUANT = {GGMLType.Q8_0: _q_q8_0, GGMLType.Q4_0: _q_q4_0, GGMLType.Q4_1: _q_q4_1,
          GGMLType.Q5_0: _q_q5_0, GGMLType.Q5_1: _q_q5_1,
          # gguf-py has no K-quant quantizer: ggml's reference semantics, see gguf_kquant.py
          GGMLType.Q4_K: lambda x: kquant_blocks(x, "Q4_K"),
          GGMLType.Q5_K: lambda x: kquant_blocks(x, "Q5_K"),
          GGMLType.Q6_K: lambda x: kquant_blocks(x, "Q6_K")}
QUANTIZABLE_TYPES = tuple(FLOAT_TYPES) + tuple(_QUANT)


def quantizable_type(qtype) -> GGMLType | None:
    """The GGMLType ``qtype`` names if diffquant can write it (quantize to it), else None."""
    if not isinstance(qtype, (str, int)) or isinstance(qtype, bool):
        return None  # ggml_type(8.5) would be Q8_0, ggml_type(True) F16
    try:
        kind = ggml_type(qtype)
    except QuantizationError:
        return None
    return kind if kind in QUANTIZABLE_TYPES else None


def quantize(weight: torch.Tensor, qtype) -> torch.Tensor:
    """Values (..., n) -> uint8 blocks (..., nbytes) of GGUF type ``qtype`` (float types too).

    Bit-identical to ``gguf.quants.quantize`` (the reference of llama.cpp's converters); Q4_K,
    Q5_K and Q6_K, which gguf-py cannot write, follow ggml's reference quantizers (gguf_kquant.py).
    """
    qtype = ggml_type(qtype)
    if qtype not in QUANTIZABLE_TYPES:
        raise QuantizationError(f"GGUF {qtype.name}: diffquant can load this type but not quantize "
                                f"to it; use one of {[t.name for t in QUANTIZABLE_TYPES]}")
    shape = byte_shape(tuple(weight.shape), qtype)
    if qtype in FLOAT_TYPES:
        return weight.detach().to(FLOAT_TYPES[qtype]).contiguous().view(torch.uint8)
    blocks = weight.detach().float().reshape(-1, BLOCK_LAYOUT[qtype][0])   # (n_blocks, block_size)
    return _QUANT[qtype](blocks).reshape(shape)
