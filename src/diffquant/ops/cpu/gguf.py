"""GGUF weights prepared for the CPU: raw ggml blocks -> ``linear.PreparedWeight``, run as
their routes in ``dispatch.ROUTES`` say.

- many rows: the blocks decoded into the reused buffer, by ``native/gguf.py``'s C decoder
  (each block decoded once in registers and written once), else by the reference
  (``formats/gguf.dequantize``) over cache-sized row chunks: the same float32 math, bit for bit;
- few rows on a CPU: torch's int4pack kernel, derived once from the blocks. Q4_0, Q4_1 and Q4_K
  are int4 with one (scale, min) per 32 columns; Q8_0 is split exactly into two int4 halves,
  q = 16 * (q >> 4) + (q & 15), each with its own per-32 scale, run as one product over [x, x].
  Scales are rounded to the activation dtype there (bf16 rounding level). Q6_K has one scale per
  16 columns, finer than the kernel's smallest group (32): each 16 become a group of 32 over
  [x, 16 x] (``q6_k_int4_codes``);
- one row: Q8_0 and Q6_K to ``native/gguf.gemv``, which reads the blocks in place (no 1.25
  B/weight copy), Q4_0 / Q4_1 / Q4_K to the 4-bit one-row product where it runs.

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
from ..formats.gguf import GGMLType
from ..native import gguf as native_gguf
from .dispatch import ROUTES, Route
from .int4 import int4_few_rows, int4pack_matmul, pack_int4_cpu
from .linear import Packed, PreparedWeight
from .scratch import dequant_rows


def dequantize_into(blocks: torch.Tensor, qtype, out: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [N, bytes] of ``qtype`` -> ``out`` [N, K] (any float dtype), returned.

    Bit-identical to ``formats.gguf.dequantize(blocks, qtype, out.dtype)``: the C decoder where
    it takes them, else that function over row chunks (their float32 temporaries stay in the
    caches, and a weight never has a whole float32 copy).
    """
    qtype = gd.ggml_type(qtype)
    if _native_decodes(blocks, qtype, out):
        return native_gguf.decode_into(blocks, qtype, out)

    def fill(r0, r1, t):                                                  # t [R, K] float32
        t.copy_(gd.dequantize(blocks[r0:r1], qtype))

    return dequant_rows(out, torch.float32, fill)


def _native_decodes(blocks: torch.Tensor, qtype, out: torch.Tensor) -> bool:
    """Whether the compiled decoder (5-10x faster, same bits) can fill ``out``."""
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
    size = gd.BLOCK_LAYOUT[qtype][1]
    if qtype == GGMLType.Q8_0:
        b = blocks.view(n, -1, size)
        q = b[..., 2:].view(torch.int8).reshape(n, -1)                    # [N, K]
        d = gd.half_floats(b[..., :2]).view(n, -1)                        # [N, G]
        high = (q >> 4) + 8                                               # q >> 4 in [-8, 7]
        low = q & 0x0F                                                    # low nibble, 0..15
        return [(high, 16 * d, torch.zeros_like(d)), (low, d, 8 * d)]
    if qtype == GGMLType.Q4_K:
        b = blocks.view(n, -1, size)
        ds, dm = gd.q4_k_scales(b.reshape(-1, size))                      # [N * S, 8] each
        qs = b[..., 16:].reshape(n, -1, 4, 32)
        codes = _pair_codes(qs & 0x0F, qs >> 4, n)
        ds, dm = ds.reshape(n, -1), dm.reshape(n, -1)
        return [(codes, ds, 8 * ds - dm)]
    off = 2 if qtype == GGMLType.Q4_0 else 4                              # f16 d (, f16 m)
    b = blocks.view(n, -1, size)
    d = gd.half_floats(b[..., :2]).view(n, -1)
    codes = _pair_codes(b[..., off:] & 0x0F, b[..., off:] >> 4, n)
    zero = torch.zeros_like(d) if qtype == GGMLType.Q4_0 else \
        gd.half_floats(b[..., 2:4]).view(n, -1) + 8 * d
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
    n, k = gd.logical_shape(tuple(blocks.shape), GGMLType.Q6_K)
    size = gd.BLOCK_LAYOUT[GGMLType.Q6_K][1]
    q, scale = gd.q6_k_codes(blocks.contiguous().view(-1, size))          # q in 0..63
    qv = q.view(n, k // 16, 16)
    codes = torch.stack([qv & 0x0F, (qv >> 4) + 6], dim=2).reshape(n, 2 * k)
    scale = scale.reshape(n, k // 16)
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

    return Packed(run, one_row)  # PreparedWeight takes its one_row: the bias goes in the C call



def prepare_gguf_weight(blocks: torch.Tensor, qtype, small_rows: int | None = None,
                        lazy: bool = False) -> PreparedWeight:
    """uint8 blocks [N, bytes] of GGUF type ``qtype`` -> PreparedWeight for ``linear_weight_only``.

    ``small_rows``: up to how many rows the packed kernel is used (default the route's ``few``,
    measured). ``lazy``: build the packed kernel's copy on the first few-row call, not now.

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
    return PreparedWeight(route_of_type(qtype), n, k, dequant_into, f"gguf {qtype.name}",
                          blocks.device, packed=None if lazy or make is None else make(),
                          make_packed=make if lazy else None, small_rows=small_rows)


def route_of_type(qtype) -> Route:
    """The row of ``dispatch.ROUTES`` of GGUF type ``qtype``."""
    name = gd.ggml_type(qtype).name
    return ROUTES.get(f"gguf {name}") or ROUTES["gguf Q4_0 Q4_1 Q4_K" if name in (
        "Q4_0", "Q4_1", "Q4_K") else "gguf other"]
