"""Quantize to the GGUF K-quants Q4_K, Q5_K and Q6_K (gguf-py 0.19 can only read them).

They follow ggml's reference quantizers ``quantize_row_q{4,5,6}_K_ref``
(``ggml-quants.c``) *including* their per-sub-block scale searches, not the simpler
absmax / min-max variant: on Gaussian weights the searches cut the RMS error by about 8%
(Q4_K: 0.072 vs 0.079 of the weights' RMS) and 20% (Q6_K: 0.0177 vs 0.0221), and they are what llama.cpp's own converters (``llama-quantize``
without an imatrix) write, so a file made here holds the blocks a llama.cpp user expects.
The searches try a fixed number of candidate scales (21 for Q4_K, 16 for Q5_K, 19 for Q6_K);
each try runs over all blocks at once, so there is no Python loop over blocks.

The order is ggml's, so the bytes are defined on every CPU: every sum runs one value after the
other as ggml's C loops do (``_sum``: one torch add per position, across all groups at once,
never a torch reduction, whose order follows its vectorisation), every product and sum is its
own rounded float32 operation, divisions are divisions (torch's ``c / t`` is reciprocal(t) * c:
``_over``), rounding is ggml's ``nearest_int`` bit for bit (ties to even, its own values past
2^22), the square root goes through float64 (torch's float32 sqrt is not correctly rounded on
every CPU), maxima take the first strict winner as ggml's ``if (a > max)``, and where a stored
scale is 0 the search's codes stay, as in ggml. So the bytes are those of ggml's
``quantize_row_q{4,5,6}_K_ref`` built without FMA contraction (-ffp-contract=off): compared on
Gaussian rows and special blocks, 0 bytes differ. A build that fuses multiply-adds (gcc's
default -march=native on an FMA CPU) rounds differently: 0.5% (Q4_K), 3.5% (Q5_K) and 0.01%
(Q6_K) of its bytes differ, near ties between candidate scales. Before this order was fixed,
torch's reductions and reciprocals made 0.22% / 1.4% / 0.12% of the bytes differ from ggml's.
The C kernels of ops/native (csrc/quantize_kquant.c, quantize_q6k.c) run the same operations in
the same order and give these bytes, faster.

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
_EPS = torch.tensor(1e-15, dtype=torch.float32)  # ggml's GROUP_MAX_EPS, a float


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit: float32 -> int32 through the mantissa of v + 1.5 * 2^23
    (ties to even; past 2^22 its own values, which the callers' clamps then bound)."""
    return ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _over(num: float, den: torch.Tensor) -> torch.Tensor:
    """float32 num / den as C divides (torch's ``num / tensor`` is reciprocal(den) * num)."""
    return torch.full_like(den, num).div_(den)


def _sum(terms: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """ggml's loop ``acc += terms[i]`` over dim 0 in order, from 0 (or from ``first``, ggml's
    ``sum = t[0]; for i >= 1``): (n, g) -> (g,). One add per position, each across all groups."""
    acc = torch.zeros_like(terms[0]) if first is None else first.clone()
    for t in terms[0 if first is None else 1:]:
        acc.add_(t)
    return acc


def _f16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n,) -> (its fp16 value as float32 (n,), its 2 little-endian bytes (n, 2))."""
    h = x.to(torch.float16)
    return h.float(), h.view(torch.uint8).reshape(-1, 2)


def _max_where(values: torch.Tensor, by: torch.Tensor | None = None):
    """ggml's ``if (by[j] > best) best = by[j], m = values[j]`` over dim 1 from 0:
    (n, k) -> (m (n,), best (n,)). A NaN never wins."""
    by = values if by is None else by
    best, m = torch.zeros_like(by[:, 0]), torch.zeros_like(values[:, 0])
    for j in range(by.shape[1]):
        win = by[:, j] > best
        best, m = torch.where(win, by[:, j], best), torch.where(win, values[:, j], m)
    return m, best


# -- Q4_K, Q5_K -----------------------------------------------------------------------------------
def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """ggml's make_qkx2_quants(rdelta 0.1, use_mad false) over groups: x, w (32, g), value i of
    group j at [i, j] -> (scale (g,), -min (g,), codes (32, g) int32 of the best grid).

    Starts from the min/max fit, then tries ``nstep + 1`` stretched grids and keeps the weighted
    least-squares (scale, min) of the grid with the smallest weighted squared error. As in ggml,
    each grid is laid from the best min found so far (not the values' min): ggml overwrites
    ``min`` when a grid wins, and later grids start from it.
    """
    mn, mx = x[0].clone(), x[0].clone()
    for v in x[1:]:
        mn, mx = torch.where(v < mn, v, mn), torch.where(v > mx, v, mx)
    sum_w, sum_x = _sum(w, w[0]), _sum(w * x, w[0] * x[0])
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    min0, flat = mn, mx == mn
    iscale = _over(float(nmax), mx - mn)
    scale = _over(1.0, iscale)
    codes = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = scale * codes.float() + mn - x
    best = _sum(w * (diff * diff))
    for step in range(nstep + 1):
        stretch = float(np.float32(rmin) + np.float32(0.1) * np.float32(step) + np.float32(nmax))
        iscale = _over(stretch, mx - mn)
        laux = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
        lf = laux.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lf), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the grid must reach down to the values: the min stays <= 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        diff = this_scale * lf + this_min - x
        err = _sum(w * (diff * diff))
        better = (det > 0) & (err < best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
        best = torch.where(better, err, best)
        codes = torch.where(better, laux, codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)   # ggml returns before searching
    return scale, -torch.where(flat, min0, mn), torch.where(flat, torch.zeros_like(codes), codes)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (n, 8) uint8 -> ggml's 12-byte packing (n, 12)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6),
                      (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], dim=-1)


def _six_bits(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``uint8_t l = nearest_int(v); l = MIN(63, l)`` (the uint8_t wraps a negative)."""
    return (_nearest_int(v) & 0xFF).clamp_(max=63).to(torch.uint8)


def _scaled_mins_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K's common part: (n, 256) -> (d bytes (n, 2), dmin bytes (n, 2), the 12 packed
    scale/min bytes (n, 12), and the values q in 0..nmax (n, 8, 32) requantized against the
    scales as stored). ggml: quantize_row_q4_K_ref / quantize_row_q5_K_ref."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    xt = sub.reshape(n * 8, 32).t().contiguous()                               # (32, n * 8)
    av = torch.sqrt((_sum(xt * xt) / 32).double()).float()   # correctly rounded (see above)
    scales, mins, codes = _make_qkx2_quants(xt, av + xt.abs(), nmax, rmin, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = _max_where(scales)[0], _max_where(mins)[0]           # (n,)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _over(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _over(63.0, max_min), zero)
    ls, lm = _six_bits(inv_scale[:, None] * scales), _six_bits(inv_min[:, None] * mins)
    d, d_bytes = _f16(max_scale / 63)
    dmin, dmin_bytes = _f16(max_min / 63)
    # requantize against the scales as stored (fp16 d times the 6-bit integers); where that
    # scale is 0 ggml keeps the search's codes
    dl = (d[:, None] * ls.float()).unsqueeze(-1)                               # (n, 8, 1)
    dm = (dmin[:, None] * lm.float()).unsqueeze(-1)
    q = _nearest_int((sub + dm) / dl).clamp_(0, nmax)                         # ggml divides
    searched = codes.t().reshape(n, 8, 32)
    q = torch.where(dl != 0, q, searched).to(torch.uint8)                      # (n, 8, 32)
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
def _make_qx_quants(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(rmse_type 1): x (16, g), value i of group j at [i, j] -> (signed
    scale (g,), codes (16, g) int32 in 0..2 nmax - 1); 0 and codes 0 for an all-zero group.

    The grid is anchored so the value of largest magnitude maps to -nmax; 19 slightly stretched
    grids are tried and the x^2-weighted least-squares scale of the best one is kept.
    """
    big, amax = _max_where(x.t(), x.t().abs())                                 # (g,) signed
    zero = amax < _EPS
    w = x * x
    wx = w * x

    def fit(stretch: float):
        q = _nearest_int(_over(-stretch, big) * x).clamp_(-nmax, nmax - 1)
        qf = q.float()
        return _sum(wx * qf), _sum(w * qf * qf), q + nmax

    sumlx, suml2, codes = fit(float(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for step in (s for s in range(-9, 10) if s):
        sumlx, suml2, q = fit(float(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
        codes = torch.where(better, q, codes)
    return (torch.where(zero, torch.zeros_like(scale), scale),
            torch.where(zero, torch.zeros_like(codes), codes))


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 210) uint8 Q6_K super-blocks."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scales, codes = _make_qx_quants(sub.reshape(n * 16, 16).t().contiguous())
    scales = scales.reshape(n, 16)
    max_scale, max_abs = _max_where(scales, scales.abs())                      # (n,) signed
    empty = max_abs < _EPS
    iscale = _over(-128.0, max_scale)
    d, d_bytes = _f16(_over(1.0, iscale))
    ls = _nearest_int(iscale[:, None] * scales).clamp_(max=127)                # (n, 16)
    ls = (ls & 0xFF).to(torch.uint8).view(torch.int8)                          # int8_t: wraps
    dl = (d[:, None] * ls.float()).unsqueeze(-1)                               # (n, 16, 1)
    q = _nearest_int(sub / dl).clamp_(-32, 31) + 32                            # ggml divides
    q = torch.where(dl != 0, q, codes.t().reshape(n, 16, 16)).to(torch.uint8)  # 0: the search's
    q = q.reshape(n, 2, 4, 32)   # per 128 values: four runs of 32
    low = q & 0x0F
    ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), ls.view(torch.uint8), d_bytes], dim=-1)
    return torch.where(empty[:, None], torch.zeros_like(out), out)  # ggml zeroes the block


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
