"""Fast GGUF linear: raw ggml blocks -> ``fast_linear.PreparedWeight``.

Two paths, chosen per call by ``fast_linear.linear_weight_only``:

- dequantize into the reused buffer with one output pass per nibble half: the float32 math of
  ``gguf_dequant`` (so the values are bit-identical to ``gguf_dequant.dequantize``), written
  straight into the buffer's dtype by ``torch.mul`` / ``torch.addcmul`` with ``out=``;
- few rows on a CPU: torch's int4pack kernel, derived once from the blocks. Q4_0, Q4_1 and Q4_K
  are int4 with one (scale, min) per 32 columns; Q8_0 is split exactly into two int4 halves,
  q = 16 * (q >> 4) + (q & 15), each with its own per-32 scale, and the two products are summed.
  Scales are rounded to the activation dtype there (bf16 rounding level). Q6_K has one scale per
  16 columns, finer than the kernel's smallest group (32): it always dequantizes.

Example:
    >>> import torch
    >>> from diffquant.ops import gguf_dequant as gd
    >>> from diffquant.ops.fast_linear import linear_weight_only
    >>> w = prepare_gguf_weight(gd.quantize(torch.randn(32, 64), "Q4_0"), "Q4_0")
    >>> linear_weight_only(torch.randn(3, 64, dtype=torch.bfloat16), w).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch

from ..errors import QuantizationError
from . import gguf_dequant as gd
from .fast_linear import SMALL_ROWS, PreparedWeight, int4pack_matmul, pack_int4_cpu, scratch_buffer
from .gguf_dequant import GGMLType

QK_K = gd.QK_K


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian half-float bytes (any strides) -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [...] -> (low, high) nibbles, each in a reused uint8 buffer of the same shape."""
    lo = scratch_buffer(qs.shape, torch.uint8, qs.device, tag + "lo")
    hi = scratch_buffer(qs.shape, torch.uint8, qs.device, tag + "hi")
    return torch.bitwise_and(qs, 0x0F, out=lo), torch.bitwise_right_shift(qs, 4, out=hi)


# -- dequantize into out [N, K]: blocks viewed as [N, G, type_size] ------------------------------
def _dq_q8_0(b, out):
    n, g = b.shape[:2]
    torch.mul(b[..., 2:].view(torch.int8), _f16(b[..., :2]), out=out.view(n, g, 32))


def _dq_q4_0(b, out):
    n, g = b.shape[:2]
    d = _f16(b[..., :2])                                                  # [N, G, 1]
    halves = out.view(n, g, 2, 16)                                        # element i, i + 16
    lo, hi = _nibbles(b[..., 2:], "q4_0")                                 # [N, G, 16] each
    # d * (u - 8) == d * u - 8 * d exactly in float32 (11-bit d, 4-bit u)
    torch.addcmul(-8 * d, lo, d, out=halves[:, :, 0])
    torch.addcmul(-8 * d, hi, d, out=halves[:, :, 1])


def _dq_q4_1(b, out):
    n, g = b.shape[:2]
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])                            # [N, G, 1]
    halves = out.view(n, g, 2, 16)
    lo, hi = _nibbles(b[..., 4:], "q4_1")
    torch.addcmul(m, lo, d, out=halves[:, :, 0])
    torch.addcmul(m, hi, d, out=halves[:, :, 1])


def _q4_k_scales(b):
    """[N, S, 144] blocks -> (scale, min) float32 [N, S, 8], one per 32-value sub-block."""
    n, s = b.shape[:2]
    sc, mn = gd._scale_min_k4(b[..., 4:16].reshape(-1, 12))               # [N*S, 8] each
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])                         # [N, S, 1]
    return d * sc.view(n, s, 8), dmin * mn.view(n, s, 8)


def _dq_q4_k(b, out):
    n, s = b.shape[:2]
    ds, dm = _q4_k_scales(b)                                              # [N, S, 8]
    ds, dm = ds.view(n, s, 4, 2, 1), -dm.view(n, s, 4, 2, 1)
    # sub-block 2r holds the low nibbles of 32-byte run r, sub-block 2r + 1 the high ones
    runs = out.view(n, s, 4, 2, 32)
    lo, hi = _nibbles(b[..., 16:].view(n, s, 4, 32), "q4_k")
    torch.addcmul(dm[:, :, :, 0], lo, ds[:, :, :, 0], out=runs[:, :, :, 0])
    torch.addcmul(dm[:, :, :, 1], hi, ds[:, :, :, 1], out=runs[:, :, :, 1])


def _q6_k_codes(b):
    """[N, S, 210] blocks -> signed codes int8 [N, S, 2, 4, 32] (q - 32), element order.

    Element 128h + 32c + l takes the low (c < 2) or high nibble of ql[64h + 32(c % 2) + l] and
    bits 2c..2c+1 of qh[32h + l] (ggml's dequantize_row_q6_K).
    """
    n, s = b.shape[:2]
    ql = b[..., :128].view(n, s, 2, 2, 32)
    qh = b[..., 128:192].view(n, s, 2, 1, 32)
    q = scratch_buffer((n, s, 2, 4, 32), torch.uint8, b.device, "q6_k")
    torch.bitwise_and(ql, 0x0F, out=q[:, :, :, :2])
    torch.bitwise_right_shift(ql, 4, out=q[:, :, :, 2:])
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    high = ((qh >> shifts) & 3) << 4                                      # [N, S, 2, 4, 32]
    return q.bitwise_or_(high).view(torch.int8).sub_(32)


def _dq_q6_k(b, out):
    n, s = b.shape[:2]
    d = _f16(b[..., 208:210])                                             # [N, S, 1]
    scale = d * b[..., 192:208].view(torch.int8).float()                  # [N, S, 16]
    q = _q6_k_codes(b).view(n, s, 16, 16)
    torch.mul(q, scale.unsqueeze(-1), out=out.view(n, s, 16, 16))


_FAST = {GGMLType.Q8_0: (32, 34, _dq_q8_0), GGMLType.Q4_0: (32, 18, _dq_q4_0),
         GGMLType.Q4_1: (32, 20, _dq_q4_1), GGMLType.Q4_K: (QK_K, 144, _dq_q4_k),
         GGMLType.Q6_K: (QK_K, 210, _dq_q6_k)}


def dequantize_into(blocks: torch.Tensor, qtype, out: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [N, bytes] of ``qtype`` -> ``out`` [N, K] (any float dtype), returned.

    Bit-identical to ``gguf_dequant.dequantize(blocks, qtype, out.dtype)``; types without a fast
    path go through it.
    """
    qtype = gd.ggml_type(qtype)
    if qtype not in _FAST:
        return out.copy_(gd.dequantize(blocks, qtype, torch.float32))
    _, size, fn = _FAST[qtype]
    fn(blocks.view(blocks.shape[0], -1, size), out)
    return out


# -- int4pack codes for the few-row path ---------------------------------------------------------
def _pair_codes(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """Low/high nibble tensors [..., 2 halves stacked at dim -2] -> codes [N, K] uint8."""
    return torch.stack([lo, hi], dim=-2).reshape(n, -1)


def int4_codes(blocks: torch.Tensor, qtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """uint8 blocks [N, bytes] -> [(codes [N, K] in 0..15, scale [N, K/32], zero [N, K/32])]
    such that the weight is the sum over the list of (codes - 8) * scale + zero per 32 columns.
    """
    qtype = gd.ggml_type(qtype)
    n = blocks.shape[0]
    if qtype not in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q8_0):
        raise QuantizationError(f"GGUF {qtype.name}: no int4pack mapping; use the dequantize path")
    if qtype == GGMLType.Q8_0:
        b = blocks.view(n, -1, 34)
        q = b[..., 2:].view(torch.int8).reshape(n, -1)                    # [N, K]
        d = _f16(b[..., :2]).view(n, -1)                                  # [N, G]
        high = (q >> 4) + 8                                               # q >> 4 in [-8, 7]
        low = q & 0x0F                                                    # low nibble, 0..15
        return [(high, 16 * d, torch.zeros_like(d)), (low, d, 8 * d)]
    if qtype == GGMLType.Q4_K:
        b = blocks.view(n, -1, 144)
        ds, dm = _q4_k_scales(b)
        qs = b[..., 16:].reshape(n, -1, 4, 32)
        codes = _pair_codes(qs & 0x0F, qs >> 4, n)
        ds, dm = ds.reshape(n, -1), dm.reshape(n, -1)
        return [(codes, ds, 8 * ds - dm)]
    size, off = (18, 2) if qtype == GGMLType.Q4_0 else (20, 4)
    b = blocks.view(n, -1, size)
    d = _f16(b[..., :2]).view(n, -1)
    codes = _pair_codes(b[..., off:] & 0x0F, b[..., off:] >> 4, n)
    zero = torch.zeros_like(d) if qtype == GGMLType.Q4_0 else _f16(b[..., 2:4]).view(n, -1) + 8 * d
    return [(codes, d, zero)]


def prepare_gguf_weight(blocks: torch.Tensor, qtype, small_rows: int = SMALL_ROWS) -> PreparedWeight:
    """uint8 blocks [N, bytes] of GGUF type ``qtype`` -> PreparedWeight for ``linear_weight_only``.

    Example:
        >>> import torch
        >>> from diffquant.ops import gguf_dequant as gd
        >>> prepare_gguf_weight(gd.quantize(torch.randn(32, 64), "Q8_0"), "Q8_0").in_features
        64
    """
    qtype = gd.ggml_type(qtype)
    n, k = gd.logical_shape(tuple(blocks.shape), qtype)
    if blocks.dim() != 2:
        raise QuantizationError(f"GGUF {qtype.name}: expected 2-d blocks [out, bytes], got "
                                f"{list(blocks.shape)}")

    def dequant_into(out):                                                # out [N, K]
        dequantize_into(blocks, qtype, out)

    packed = None
    if blocks.device.type == "cpu" and qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K,
                                                 GGMLType.Q8_0):
        packs = [pack_int4_cpu(c, s, z, 32) for c, s, z in int4_codes(blocks, qtype)]
        packed = int4pack_matmul(n, 32, packs)
    return PreparedWeight(n, k, dequant_into, None, packed, small_rows, f"gguf {qtype.name}",
                          blocks.device)
