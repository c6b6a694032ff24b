"""GGUF weights prepared for the CPU: raw ggml blocks -> ``linear.PreparedWeight``, run as
their routes in ``dispatch.ROUTES`` say.

- many rows: the blocks decoded into the reused buffer, by ``native/gguf.py``'s C decoder
  (each block decoded once in registers and written once), else by the reference
  (``formats/gguf.dequantize``) over cache-sized row chunks: the same float32 math, bit for bit;
- one row on a CPU: ``native/gguf.gemv``, which reads the stored blocks in place for Q4_0, Q4_1,
  Q4_K, Q8_0 and Q6_K (the weight is held once: no prepared copy in another layout, whatever
  rows come; a few rows decode like many).

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
from .dispatch import ROUTES, Route
from .linear import PreparedWeight
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


def prepare_gguf_weight(blocks: torch.Tensor, qtype, small_rows: int | None = None,
                        lazy: bool = False) -> PreparedWeight:
    """uint8 blocks [N, bytes] of GGUF type ``qtype`` -> PreparedWeight for ``linear_weight_only``.

    It holds nothing but ``blocks``: one row is a C product over them in place, more rows decode
    them into the shared buffer. ``small_rows`` and ``lazy`` are accepted for the other
    ``prepare_*`` functions' signature (no copy is ever made here).

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

    one_row = None
    if qtype in native_gguf.GEMV_TYPES:
        def one_row(x2, bias):                              # [1, K] -> [1, N], bias added
            if blocks.is_contiguous() and native_gguf.supports(qtype, x2.device):
                return native_gguf.gemv(blocks, qtype, x2, bias=bias)
            return None
    return PreparedWeight(route_of_type(qtype), n, k, dequant_into, f"gguf {qtype.name}",
                          blocks.device, one_row=one_row, small_rows=small_rows)


def route_of_type(qtype) -> Route:
    """The row of ``dispatch.ROUTES`` of GGUF type ``qtype``."""
    name = gd.ggml_type(qtype).name
    return ROUTES.get(f"gguf {name}") or ROUTES["gguf Q4_0 Q4_1 Q4_K" if name in (
        "Q4_0", "Q4_1", "Q4_K") else "gguf other"]
