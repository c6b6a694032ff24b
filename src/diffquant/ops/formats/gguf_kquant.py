"""Quantize to the GGUF K-quants Q4_K, Q5_K and Q6_K (gguf-py 0.19 can only read them).

They follow ggml's reference quantizers ``quantize_row_q{4,5,6}_K_ref``
(``ggml-quants.c``) *including* their per-sub-block scale searches, not the simpler
absmax / min-max variant: on Gaussian weights the searches cut the RMS error by about 8%
(Q4_K: 0.072 vs 0.079 of the weights' RMS) and 20% (Q6_K: 0.0177 vs 0.0221), and they are what llama.cpp's own converters (``llama-quantize``
without an imatrix) write, so a file made here holds the blocks a llama.cpp user expects.
The searches try a fixed number of candidate scales (21 for Q4_K, 16 for Q5_K, 19 for Q6_K);
each try runs over all blocks at once, so there is no Python loop over blocks. Sums run in
float32 in torch's order, not ggml's one-by-one C loop, so a near tie between two candidate
scales can go the other way: against ggml's own ``quantize_row_q*_K_ref`` (built with
-march=native) on Gaussian rows, 0.3% (Q4_K), 1.4% (Q5_K) and 0.15% (Q6_K) of the bytes differ
and the RMS error agrees to four digits. The format and the dequantized meaning are exactly
ggml's (``gguf.quants.dequantize`` decodes them).

Block layouts (one super-block = 256 values of a row):

    Q4_K, 144 bytes: fp16 d | fp16 dmin | 12 bytes: eight 6-bit scales + eight 6-bit mins
        (ggml's get_scale_min_k4 packing) | 128 bytes of nibbles.
        value = d * scale_j * q - dmin * min_j, q in 0..15, sub-block j = 32 values
    Q5_K, 176 bytes: as Q4_K, with 32 bytes qh between the scales and the nibbles: bit j of
        qh[l] is the fifth bit of value l of sub-block j, q in 0..31
    Q6_K, 210 bytes: 128 bytes ql (low 4 bits) | 64 bytes qh (high 2 bits) | 16 int8 scales
        | fp16 d.   value = d * scale_j * (q - 32), q in 0..63, sub-block j = 16 values

Example:
    >>> import torch
    >>> from diffquant.ops.formats.gguf_kquant import quantize_q4_k
    >>> from diffquant.ops.formats.gguf import dequantize
    >>> w = torch.randn(4, 512)
    >>> blocks = quantize_q4_k(w)                     # (4, 288) uint8: 2 super-blocks per row
    >>> ((dequantize(blocks, "Q4_K") - w).norm() / w.norm()) < 0.1
    tensor(True)
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import QuantizationError

QK_K = 256
_CHUNK = 16384  # super-blocks per pass: bounds the temporaries of the searches (~16 MB each)


def _round(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int rounds half to even (the FPU default), as torch.round does."""
    return torch.round(x)


def _f16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n, 1) -> (its fp16 value as float32 (n, 1), its 2 little-endian bytes (n, 2))."""
    h = x.to(torch.float16)
    return h.float(), h.view(torch.uint8)


# -- Q4_K ----------------------------------------------------------------------------------------
def _weighted_error(x, w, scale, mn, q):
    """sum_i w_i (scale * q_i + mn - x_i)^2 over the last dim. (g, 32) -> (g, 1)"""
    return (w * (scale * q + mn - x) ** 2).sum(-1, keepdim=True)


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0,
                      rdelta: float = 0.1, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants over groups: (g, n) values and weights -> scale, -min, each (g, 1).

    Starts from the min/max fit, then tries ``nstep + 1`` stretched grids and keeps the weighted
    least-squares (scale, min) of the grid with the smallest weighted squared error. As in ggml,
    each grid is laid from the best min found so far (not the values' min): ggml overwrites
    ``min`` when a grid wins, and later grids start from it.
    """
    lo = x.amin(-1, keepdim=True).clamp(max=0)                                 # (g, 1)
    hi = x.amax(-1, keepdim=True)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    iscale = nmax / span
    scale, mn = 1 / iscale, lo
    q = _round(iscale * (x - lo)).clamp(0, nmax)                               # (g, n)
    best = _weighted_error(x, w, scale, mn, q)
    one = torch.ones_like(hi)
    for step in range(nstep + 1):  # in-place where possible: ~6 passes over the values a step
        stretch = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = stretch / torch.where(flat, one, hi - mn)                     # (g, 1)
        q = (x - mn).mul_(iscale).round_().clamp_(0, nmax)                    # (g, n)
        wq = w * q
        sum_l, sum_l2 = wq.sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True)
        sum_xl = wq.mul_(x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the grid must reach down to the values: the min stays <= 0
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=torch.finfo(x.dtype).tiny),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        diff = q.mul_(this_scale).add_(this_min).sub_(x)                      # scale q + min - x
        err = diff.mul_(diff).mul_(w).sum(-1, keepdim=True)
        better = (det > 0) & (err < best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
        best = torch.where(better, err, best)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, lo, mn)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (n, 8) uint8 -> ggml's 12-byte packing (n, 12)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6),
                      (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], dim=-1)


def _scaled_mins_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K's common part: (n, 256) -> (d bytes (n, 2), dmin bytes (n, 2), the 12 packed
    scale/min bytes (n, 12), and the values q in 0..nmax (n, 8, 32) requantized against the
    scales as stored). ggml: quantize_row_q4_K_ref / quantize_row_q5_K_ref."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    av = sub.pow(2).mean(-1, keepdim=True).sqrt()                              # (n, 8, 1)
    scales, mins = _make_qkx2_quants(sub.reshape(-1, 32), (av + sub.abs()).reshape(-1, 32),
                                     nmax=nmax, rmin=rmin, nstep=nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = scales.amax(-1, keepdim=True).clamp(min=0)                     # (n, 1)
    max_min = mins.amax(-1, keepdim=True).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = _round(inv_scale * scales).clamp(0, 63).to(torch.uint8)               # (n, 8)
    lm = _round(inv_min * mins).clamp(0, 63).to(torch.uint8)
    d, d_bytes = _f16(max_scale / 63)
    dmin, dmin_bytes = _f16(max_min / 63)
    # requantize against the scales as stored (fp16 d times the 6-bit integers)
    dl = (d * ls.float()).unsqueeze(-1)                                        # (n, 8, 1)
    dm = (dmin * lm.float()).unsqueeze(-1)
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    q = torch.where(dl != 0, _round((sub + dm) / safe), torch.zeros_like(sub))  # ggml divides
    q = q.clamp(0, nmax).to(torch.uint8)                                       # (n, 8, 32)
    return d_bytes, dmin_bytes, _pack_scale_min_k4(ls, lm), q


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 144) uint8 Q4_K super-blocks."""
    n = x.shape[0]
    d_bytes, dmin_bytes, scales, q = _scaled_mins_k(x, nmax=15, rmin=-1.0, nstep=20)
    q = q.reshape(n, 4, 2, 32)   # 64-value runs: the first 32 in low nibbles, the next in high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([d_bytes, dmin_bytes, scales, qs], dim=-1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 176) uint8 Q5_K super-blocks."""
    n = x.shape[0]
    d_bytes, dmin_bytes, scales, q = _scaled_mins_k(x, nmax=31, rmin=-0.5, nstep=15)
    low = q & 0x0F
    qs = (low.reshape(n, 4, 2, 32)[:, :, 0] | (low.reshape(n, 4, 2, 32)[:, :, 1] << 4)).reshape(n, 128)
    # the fifth bit of value l of sub-block j is bit j of qh[l]
    high = (q >> 4).to(torch.int32) << torch.arange(8, device=x.device, dtype=torch.int32).view(1, 8, 1)
    qh = high.sum(1).to(torch.uint8)                                           # (n, 32)
    return torch.cat([d_bytes, dmin_bytes, scales, qh, qs], dim=-1)


# -- Q6_K ----------------------------------------------------------------------------------------
def _make_qx_quants(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """ggml's make_qx_quants(rmse_type=1): (g, n) -> signed scale (g, 1), 0 for all-zero groups.

    The grid is anchored so the value of largest magnitude maps to -nmax; 19 slightly stretched
    grids are tried and the x^2-weighted least-squares scale of the best one is kept.
    """
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))                       # (g, 1) signed
    zero = big.abs() < 1e-15  # GROUP_MAX_EPS
    big = torch.where(zero, torch.ones_like(big), big)
    w = x * x

    def fit(stretch: float):
        q = _round(-(nmax + stretch) / big * x).clamp(-nmax, nmax - 1)
        return (w * x * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)

    sumlx, suml2 = fit(0.0)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for step in (s for s in range(-9, 10) if s):
        sumlx, suml2 = fit(0.1 * step)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2.clamp(min=torch.finfo(x.dtype).tiny), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 210) uint8 Q6_K super-blocks."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scales = _make_qx_quants(sub.reshape(-1, 16)).reshape(n, 16)
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))      # (n, 1) signed
    empty = max_scale.abs() < 1e-15
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d, d_bytes = _f16(1 / iscale)
    ls = _round(iscale * scales).clamp(-128, 127)                              # (n, 16)
    dl = (d * ls).unsqueeze(-1)                                                # (n, 16, 1)
    inv = torch.where(dl != 0, 1 / torch.where(dl != 0, dl, torch.ones_like(dl)), torch.zeros_like(dl))
    q = (_round(sub * inv).clamp(-32, 31) + 32).to(torch.uint8)              # (n, 16, 16)
    q = q.reshape(n, 2, 4, 32)   # per 128 values: four runs of 32
    low = q & 0x0F
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), ls.to(torch.int8).view(torch.uint8),
                     d_bytes], dim=-1)
    return torch.where(empty, torch.zeros_like(out), out)  # ggml zeroes an all-zero super-block


_KQUANTS = {"Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks, "Q6_K": _q6_k_blocks}


# -- public --------------------------------------------------------------------------------------
def kquant_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, type_size) uint8, ``_CHUNK`` super-blocks at a time."""
    fn = _KQUANTS[qtype]
    return torch.cat([fn(c) for c in blocks.split(_CHUNK)]) if blocks.shape[0] else \
        torch.empty(0, _type_size(qtype), dtype=torch.uint8, device=blocks.device)


def _type_size(qtype: str) -> int:
    """Bytes per super-block of ``qtype``, from gguf.py's one table (imported here, at call
    time: gguf.py imports this module)."""
    from .gguf import BLOCK_LAYOUT, GGMLType

    return BLOCK_LAYOUT[GGMLType[qtype]][1]


def _quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    if w.dim() == 0 or w.shape[-1] % QK_K:
        raise QuantizationError(f"GGUF {qtype}: weight of shape {list(w.shape)} cannot be quantized: "
                                f"the row length (last dim) must be a multiple of {QK_K}; keep such "
                                "weights in a float type or pick a 32-block type such as Q8_0")
    blocks = w.detach().float().reshape(-1, QK_K)                              # (n_blocks, 256)
    return kquant_blocks(blocks, qtype).reshape(*w.shape[:-1],
                                                 w.shape[-1] // QK_K * _type_size(qtype))


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """Float weight [N, K] (K a multiple of 256) -> Q4_K blocks uint8 [N, K // 256 * 144].

    Example:
        >>> quantize_q4_k(torch.randn(2, 256)).shape
        torch.Size([2, 144])
    """
    return _quantize(w, "Q4_K")


def quantize_q5_k(w: torch.Tensor) -> torch.Tensor:
    """Float weight [N, K] (K a multiple of 256) -> Q5_K blocks uint8 [N, K // 256 * 176].

    Example:
        >>> quantize_q5_k(torch.randn(2, 256)).shape
        torch.Size([2, 176])
    """
    return _quantize(w, "Q5_K")


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """Float weight [N, K] (K a multiple of 256) -> Q6_K blocks uint8 [N, K // 256 * 210].

    Example:
        >>> quantize_q6_k(torch.randn(2, 256)).shape
        torch.Size([2, 210])
    """
    return _quantize(w, "Q6_K")


__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "kquant_blocks"]
