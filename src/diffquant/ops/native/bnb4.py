"""bitsandbytes' 4-bit weights (NF4/FP4) through the C kernels (``csrc/bnb4.c``): the one-row
product reading the packed codes in place, and the decode into a bf16 buffer, bitsandbytes'
``dequantize_4bit`` bit for bit. ``ops/cpu/int4.py``'s bitsandbytes weight uses them.

Example:
    >>> import torch
    >>> lut, absmax = torch.linspace(-1, 1, 16), torch.ones(2)
    >>> packed = torch.zeros(64, dtype=torch.uint8)                  # [2, 64] of code 0: -1
    >>> out = torch.empty(2, 64, dtype=torch.bfloat16)
    >>> if registry.bf16_weight_supported(out, packed):
    ...     assert (lut4_decode_into(packed, lut, absmax, 64, out) == -1).all()
"""

from __future__ import annotations

import torch

from . import registry


def lut4_gemv(packed: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor, blocksize: int,
              shape: tuple[int, int], x2: torch.Tensor, portable: bool = False,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ W.T (+ bias [N], as ``y.add_(bias)``) for a bitsandbytes NF4/FP4 weight of
    ``shape`` [N, K] -> [1, N] in x's dtype: packed uint8 (element i in the high nibble of byte
    i / 2 when i is even), ``lut`` the 16 float32 code values, ``absmax`` float32 per
    ``blocksize`` elements (expanded)."""
    n, k = shape
    if x2.shape != (1, k) or k % 2 or lut.numel() != 16 \
            or packed.numel() * packed.element_size() * 2 < n * k:
        raise ValueError(f"native 4-bit gemv: expected x [1, {k}] (K even), 16 code values, "
                         f"{n * k // 2} bytes")
    p = packed.contiguous().view(torch.uint8)
    lut, absmax = lut.float().contiguous(), absmax.float().contiguous()
    return registry.one_row("lut4_gemv", n, x2, portable, bias=bias, packed=p, lut=lut,
                            absmax=absmax, blocksize=blocksize, k=k)


def lut4_decode_into(packed: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor,
                     blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """bitsandbytes NF4/FP4 weight -> out bf16 [N, K] (unit column stride): bf16(code value *
    absmax), bitsandbytes' dequantize_4bit into a reused buffer. ``lut``/``absmax`` float32."""
    n, k = out.shape
    if out.dtype != torch.bfloat16 or out.stride(1) != 1 or k % 2:
        raise ValueError("native 4-bit decode writes bf16 rows of even length with unit stride")
    p = packed.contiguous().view(torch.uint8)
    registry.run("lut4_decode", n, packed=p, lut=lut, absmax=absmax, blocksize=blocksize, k=k,
                 out=out, ld=out.stride(0))
    return out
