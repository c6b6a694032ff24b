"""Fast GGUF linear: raw ggml blocks -> ``fast_linear.PreparedWeight``.

Two paths, chosen per call by ``fast_linear.linear_weight_only``:

- dequantize into the reused buffer: on a CPU with a C compiler, by the compiled decoder of
  ``native`` (each block decoded once in registers and written once, 8-15x faster); otherwise
  with a few torch ops per cache-sized chunk. Both are the float32 math of ``gguf_dequant``,
  bit for bit;
- few rows on a CPU: torch's int4pack kernel, derived once from the blocks. Q4_0, Q4_1 and Q4_K
  are int4 with one (scale, min) per 32 columns; Q8_0 is split exactly into two int4 halves,
  q = 16 * (q >> 4) + (q & 15), each with its own per-32 scale, run as one product over [x, x].
  Scales are rounded to the activation dtype there (bf16 rounding level). Q6_K has one scale per
  16 columns, finer than the kernel's smallest group (32): each 16 become a group of 32 over
  [x, 16 x] (``q6_k_int4_codes``). Q8_0 and Q6_K at one row go to ``native/gguf.gemv`` instead,
  which reads the blocks in place (no 1.25 B/weight copy).

Example:
    >>> import torch
    >>> from diffquant.ops.formats import gguf as gd
    >>> from diffquant.ops.cpu.linear import linear_weight_only
    >>> w = prepare_gguf_weight(gd.quantize(torch.randn(32, 64), "Q4_0"), "Q4_0")
    >>> linear_weight_only(torch.randn(3, 64, dtype=torch.bfloat16), w).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch

from ...errors import QuantizationError
from ..formats import gguf as gd
from ..native import gguf as native_gguf
from .int4 import int4_few_rows, int4pack_matmul, pack_int4_cpu
from .linear import INT4_SMALL_ROWS, PreparedWeight
from .scratch import chunk_rows, dequant_rows, scratch_buffer
from ..formats.gguf import GGMLType

QK_K = gd.QK_K


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian half-float bytes (any strides) -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(b: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [R, G, size] (contiguous) -> (low, high) nibbles of every byte, same shape, in
    reused buffers (whole rows at once: contiguous byte ops are vectorised, strided ones not)."""
    shape = (most, *b.shape[1:])
    lo = scratch_buffer(shape, torch.uint8, b.device, "gguf lo")[: b.shape[0]]
    hi = scratch_buffer(shape, torch.uint8, b.device, "gguf hi")[: b.shape[0]]
    return torch.bitwise_and(b, 0x0F, out=lo), torch.bitwise_right_shift(b, 4, out=hi)


# -- fill t [R, K] float32 with the values of blocks b [R, G, type_size] ------------------------
# Each is gguf_dequant's float32 math op for op (products of a half scale and a small code are
# exact in float32; the one rounding is the same add). mul_/add_ with a broadcast [.., 1] scale
# are vectorised; addcmul with broadcasts is not. Scales are decoded for the whole weight first
# (``_scales_*``, small tensors), so each chunk costs only a few large ops.
def _scales_half(b):
    """[N, G, size] -> (d,) float32 [N, G, 1] from bytes 0:2 (Q8_0, Q4_0)."""
    return (_f16(b[..., :2]),)


def _dq_q8_0(b, t, sc, most):
    r, g = b.shape[:2]
    tv = t.view(r, g, 32)
    tv.copy_(b[..., 2:].view(torch.int8))
    tv.mul_(sc[0])


def _dq_q4_0(b, t, sc, most):
    r, g = b.shape[:2]
    lo, hi = _nibbles(b, most)
    tv = t.view(r, g, 2, 16)                                              # element i, i + 16
    tv[:, :, 0].copy_(lo[..., 2:])
    tv[:, :, 1].copy_(hi[..., 2:])
    t.view(r, g, 32).sub_(8).mul_(sc[0])                                  # d * (u - 8), exact


def _scales_q4_1(b):
    return _f16(b[..., :2]), _f16(b[..., 2:4])                            # d, m [N, G, 1]


def _dq_q4_1(b, t, sc, most):
    r, g = b.shape[:2]
    lo, hi = _nibbles(b, most)
    tv = t.view(r, g, 2, 16)
    tv[:, :, 0].copy_(lo[..., 4:])
    tv[:, :, 1].copy_(hi[..., 4:])
    t.view(r, g, 32).mul_(sc[0]).add_(sc[1])                              # d * u exact, then + m


def _scales_q4_k(b):
    """[N, S, 144] blocks -> (scale, min) float32 [N, S, 8, 1], one per 32-value sub-block."""
    n, s = b.shape[:2]
    sc, mn = gd._scale_min_k4(b[..., 4:16].reshape(-1, 12))               # [N*S, 8] each
    d, dmin = _f16(b[..., :2]), _f16(b[..., 2:4])                         # [N, S, 1]
    return (d * sc.view(n, s, 8)).unsqueeze(-1), (dmin * mn.view(n, s, 8)).unsqueeze(-1)


def _dq_q4_k(b, t, sc, most):
    r, s = b.shape[:2]
    lo, hi = _nibbles(b, most)
    # sub-block 2j holds the low nibbles of 32-byte run j, sub-block 2j + 1 the high ones
    tv = t.view(r, s, 4, 2, 32)
    tv[:, :, :, 0].copy_(lo[..., 16:].view(r, s, 4, 32))
    tv[:, :, :, 1].copy_(hi[..., 16:].view(r, s, 4, 32))
    t.view(r, s, 8, 32).mul_(sc[0]).sub_(sc[1])


def _q6_k_codes(b, most):
    """[R, S, 210] blocks -> signed codes int8 [R, S, 2, 4, 32] (q - 32) in element order (a
    permuted view of a [4, R, S, 2, 32] buffer).

    Element 128h + 32c + l takes the low (c < 2) or high nibble of ql[64h + 32(c % 2) + l] and
    bits 2c..2c+1 of qh[32h + l] (ggml's dequantize_row_q6_K). The bytes are first copied
    c-major, so every bit operation then runs on contiguous int32 words (four bytes at once,
    masks keep each byte's bits apart); ops on short strided runs are several times slower.
    """
    r, s = b.shape[:2]
    ql = scratch_buffer((2, most, s, 2, 32), torch.uint8, b.device, "q6_k ql")[:, :r]
    ql.copy_(b[..., :128].view(r, s, 2, 2, 32).permute(3, 0, 1, 2, 4))  # [c % 2, R, S, h, l]
    qh = scratch_buffer((most, s, 2, 32), torch.uint8, b.device, "q6_k qh")[:r]
    qh.copy_(b[..., 128:192].view(r, s, 2, 32))                          # [R, S, h, l]
    ql32, qh32 = ql.view(torch.int32), qh.view(torch.int32)
    q = scratch_buffer((4, most, s, 2, 32), torch.uint8, b.device, "q6_k")[:, :r]
    q32 = q.view(torch.int32)                                            # [c, R, S, h, l / 4]
    torch.bitwise_and(ql32, 0x0F0F0F0F, out=q32[:2])
    torch.bitwise_right_shift(ql32, 4, out=q32[2:]).bitwise_and_(0x0F0F0F0F)
    high = scratch_buffer((4, most, s, 2, 32), torch.uint8, b.device, "q6_k high")[:, :r]
    high32 = high.view(torch.int32)
    for c in range(4):
        torch.bitwise_right_shift(qh32, 2 * c, out=high32[c])
    high32.bitwise_and_(0x03030303).bitwise_left_shift_(4)
    q32.bitwise_or_(high32)
    return q.view(torch.int8).sub_(32).permute(1, 2, 3, 0, 4)           # [R, S, h, c, l]


def _scales_q6_k(b):
    """[N, S, 210] blocks -> float32 [N, S, 16, 1], one scale per 16 values."""
    d = _f16(b[..., 208:210])                                             # [N, S, 1]
    return ((d * b[..., 192:208].view(torch.int8).float()).unsqueeze(-1),)


def _dq_q6_k(b, t, sc, most):
    r, s = b.shape[:2]
    t.view(r, s, 2, 4, 32).copy_(_q6_k_codes(b, most))
    t.view(r, s, 16, 16).mul_(sc[0])


# type -> (bytes per block, scales of the whole weight, chunk fill)
_FAST = {GGMLType.Q8_0: (34, _scales_half, _dq_q8_0), GGMLType.Q4_0: (18, _scales_half, _dq_q4_0),
         GGMLType.Q4_1: (20, _scales_q4_1, _dq_q4_1), GGMLType.Q4_K: (144, _scales_q4_k, _dq_q4_k),
         GGMLType.Q6_K: (210, _scales_q6_k, _dq_q6_k)}


def dequantize_into(blocks: torch.Tensor, qtype, out: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [N, bytes] of ``qtype`` -> ``out`` [N, K] (any float dtype), returned.

    Bit-identical to ``gguf_dequant.dequantize(blocks, qtype, out.dtype)``; types without a fast
    path go through it.
    """
    qtype = gd.ggml_type(qtype)
    if _native_decodes(blocks, qtype, out):
        return native_gguf.decode_into(blocks, qtype, out)
    if qtype not in _FAST:
        return out.copy_(gd.dequantize(blocks, qtype, torch.float32))
    size, scales, fn = _FAST[qtype]
    n, k = out.shape
    most = chunk_rows(n, k, torch.float32, out.device)
    b3 = blocks.contiguous().view(n, -1, size)                            # [N, G, size]
    sc = scales(b3)

    def fill(r0, r1, t):
        fn(b3[r0:r1], t, [s[r0:r1] for s in sc], most)

    return dequant_rows(out, torch.float32, fill)


def _native_decodes(blocks: torch.Tensor, qtype, out: torch.Tensor) -> bool:
    """Whether the compiled decoder (``native``, 5-10x faster, same bits) can fill ``out``."""
    return (out.dtype in (torch.float32, torch.bfloat16) and out.stride(1) == 1
            and blocks.dim() == 2 and blocks.is_contiguous() and blocks.device == out.device
            and native_gguf.supports(qtype, blocks.device))


# -- int4pack codes for the few-row path ---------------------------------------------------------
def _pair_codes(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """Low/high nibble tensors [..., 2 halves stacked at dim -2] -> codes [N, K] uint8."""
    return torch.stack([lo, hi], dim=-2).reshape(n, -1)


def int4_codes(blocks: torch.Tensor, qtype) -> list[tuple[torch.Tensor, ...]]:
    """uint8 blocks [N, bytes] -> [(codes [N, K] in 0..15, scale [N, K/32], zero [N, K/32])]
    such that the weight is the sum over the list of (codes - 8) * scale + zero per 32 columns.
    """
    qtype = gd.ggml_type(qtype)
    n = blocks.shape[0]
    if qtype not in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q8_0):
        raise QuantizationError(f"GGUF {qtype.name}: no direct int4pack mapping (Q6_K: see "
                                "q6_k_int4_codes; others: the dequantize path)")
    if qtype == GGMLType.Q8_0:
        b = blocks.view(n, -1, 34)
        q = b[..., 2:].view(torch.int8).reshape(n, -1)                    # [N, K]
        d = _f16(b[..., :2]).view(n, -1)                                  # [N, G]
        high = (q >> 4) + 8                                               # q >> 4 in [-8, 7]
        low = q & 0x0F                                                    # low nibble, 0..15
        return [(high, 16 * d, torch.zeros_like(d)), (low, d, 8 * d)]
    if qtype == GGMLType.Q4_K:
        b = blocks.view(n, -1, 144)
        ds, dm = _scales_q4_k(b)
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


def q6_k_int4_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K blocks [N, bytes] -> (codes [N, 2K] in 0..15, scale [N, K/16], zero [N, K/16]) for
    int4pack in groups of 32 over x' = [x_j, 16 x_j] per 16-value sub-block j (``q6_k_input``).

    A Q6_K value is s * (q - 32) with q = l + 16 h (l 4 bits, h 2 bits) and one scale s per 16
    values, finer than the kernel's smallest group. Each sub-block becomes one group of 32: its
    16 low parts l, then its 16 high parts as h + 6 against 16 x. The kernel's (u - 8) * s + z
    then sums (l - 8) s + 16 (h - 2) s + 17 z = s (q - 32) per value with z = 8 s / 17, which it
    rounds to bf16 like its scales: bf16 rounding level, as the other packed paths.
    """
    qtype = GGMLType.Q6_K
    n, k = gd.logical_shape(tuple(blocks.shape), qtype)
    b3 = blocks.contiguous().view(n, -1, 210)
    s = b3.shape[1]
    q = torch.empty(n, k, dtype=torch.uint8, device=blocks.device)             # q in 0..63
    most = chunk_rows(n, k, torch.float32, blocks.device)
    for r0 in range(0, n, most):
        r1 = min(n, r0 + most)
        q[r0:r1].view(r1 - r0, s, 2, 4, 32).copy_(_q6_k_codes(b3[r0:r1], most))
    q.view(torch.int8).add_(32)
    qv = q.view(n, k // 16, 16)
    codes = torch.stack([qv & 0x0F, (qv >> 4) + 6], dim=2).reshape(n, 2 * k)
    scale = _scales_q6_k(b3)[0].reshape(n, k // 16)
    return codes, scale, scale * (8 / 17)


def q6_k_input(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> x' [M, 2K] = [x_j, 16 x_j] per 16 columns j (16 x is exact in bf16)."""
    m, k = x2.shape
    xv = x2.view(m, k // 16, 16)
    return torch.stack([xv, xv * 16], dim=2).reshape(m, 2 * k)


def _q8_0_int4pack(blocks: torch.Tensor, n: int):
    """Q8_0's two exact int4 halves as one int4pack product over [x, x] (K doubled): one kernel
    call and one float32 accumulation instead of two bf16 results added (~10% faster)."""
    codes, scale, zero = (torch.cat(t, dim=1) for t in zip(*int4_codes(blocks, "Q8_0")))
    run = int4pack_matmul(n, 32, [pack_int4_cpu(codes, scale, zero, 32)])
    return lambda x2: run(torch.cat([x2, x2], dim=1))                     # [M, 2K] -> [M, N]


def _q6_k_int4pack(blocks: torch.Tensor, n: int):
    run = int4pack_matmul(n, 32, [pack_int4_cpu(*q6_k_int4_codes(blocks), 32)])
    return lambda x2: run(q6_k_input(x2))                                 # [M, 2K] -> [M, N]


def _with_gemv(blocks: torch.Tensor, qtype, make_int4pack):
    """Few-row product of Q8_0/Q6_K: one row goes to the compiled kernel that reads the blocks
    once (no copy of the weight), more rows (or no compiler) to the int4pack mapping (1.25
    B/weight read, copied on its first use; at 2+ rows it beats the one-row kernel)."""
    int4pack = []

    def one_row(x2, bias):                                  # [1, K] -> [1, N], bias added
        if blocks.is_contiguous() and native_gguf.supports(qtype, x2.device):
            return native_gguf.gemv(blocks, qtype, x2, bias=bias)
        return None

    def run(x2):                                                          # [M, K] -> [M, N]
        if x2.shape[0] == 1 and (y := one_row(x2, None)) is not None:
            return y
        if not int4pack:
            int4pack.append(make_int4pack())
        return int4pack[0](x2)

    run.one_row = one_row  # PreparedWeight takes it: the bias then goes in the same C call
    return run


Q8_0_SMALL_ROWS = 32  # two int4 products per call: the packed path stops paying off sooner


def prepare_gguf_weight(blocks: torch.Tensor, qtype, small_rows: int | None = None,
                        lazy: bool = False) -> PreparedWeight:
    """uint8 blocks [N, bytes] of GGUF type ``qtype`` -> PreparedWeight for ``linear_weight_only``.

    ``small_rows``: up to how many rows the packed kernel is used (default per type, measured).
    ``lazy``: build the packed kernel's copy on the first few-row call, not now.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats import gguf as gd
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

    make = None
    if blocks.device.type == "cpu" and qtype == GGMLType.Q6_K:
        def make():
            return _with_gemv(blocks, qtype, lambda: _q6_k_int4pack(blocks, n))
    elif blocks.device.type == "cpu" and qtype == GGMLType.Q8_0:
        def make():
            return _with_gemv(blocks, qtype, lambda: _q8_0_int4pack(blocks, n))
    elif blocks.device.type == "cpu" and qtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K):
        def make():
            return int4_few_rows(n, 32, *int4_codes(blocks, qtype)[0])
    if small_rows is None:
        small_rows = Q8_0_SMALL_ROWS if qtype in (GGMLType.Q8_0, GGMLType.Q6_K) else INT4_SMALL_ROWS
    return PreparedWeight(n, k, dequant_into, None, None if lazy or make is None else make(),
                          small_rows, f"gguf {qtype.name}", blocks.device, make if lazy else None)
