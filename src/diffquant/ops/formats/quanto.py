"""optimum-quanto's weight quantization (what ``QLinear.freeze`` runs), op for op in torch.

Why not call quanto: importing ``optimum.quanto`` takes ~5 s (it pulls in transformers'
machinery), and its optimizers take ``abs`` twice; quantize-on-load of a 1.16B-parameter
transformer spent 10 s there on a 2-core machine against quanto's own 3.6 s in diffusers (whose
import came before the clock). These are the same torch ops in the same order and dtypes, so the
codes and scales are quanto's bit for bit (tests/test_quanto_math.py compares them with quanto
itself over random and special values, for bf16, float16 and float32 weights).

- int8 / float8 (``AbsmaxOptimizer`` + ``quantize_symmetric``, axis 0): scale = amax|w| per
  output row / qmax (127, or 448 for float8_e4m3fn); q = w / scale, rounded (int8), clamped,
  cast.
- int4 / int2 (``MaxOptimizer`` + ``quantize_affine``, axis 0, rows of ``group`` values):
  scale = (max - min) / (2^bits - 1), shift = -min, q = round((w + shift) / scale) clamped to
  [0, 2^bits - 1]; packed along dim 0 as quanto's ``pack_weights`` (value k of byte i is row
  i + k * rows of the packed tensor).

These are the reference: loading quantizes bf16 weights on a CPU with ``ops/cpu/quantize.py``'s
C pass instead (the same ops, one pass per row, the codes written packed: the torch ops were 5
of 6.6 s of that load). ``unpack`` and ``dequantize_bits`` undo the packing.

A weight whose quantization axis has one row (quanto then quantizes per tensor) is not handled
here: ``supported`` says so and the caller uses quanto.

Example:
    >>> import torch
    >>> q, s = quantize_symmetric(torch.tensor([[1.0, -2.0], [0.5, 0.25]]), torch.int8)
    >>> q.tolist(), s.flatten().tolist()
    ([[64, -127], [127, 64]], [0.015748031437397003, 0.003937007859349251])
"""

from __future__ import annotations

import torch


def supported(w: torch.Tensor, group: int | None) -> bool:
    """Whether these functions reproduce quanto for ``w`` [out, in]: more than one row to
    quantize along (quanto switches to one scale per tensor otherwise)."""
    rows = w.shape[0] if group is None else w.numel() // group
    return w.dim() == 2 and rows > 1 and (group is None or w.shape[1] % group == 0)


def quantize_symmetric(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] of ``dtype`` (int8 or float8_e4m3fn), scale [N, 1] in w's
    dtype): quanto's absmax scale per output row and its symmetric quantization."""
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    qmax = info.max if dtype.is_floating_point else 2 ** (info.bits - 1) - 1
    scale = torch.amax(torch.abs(w), dim=[1], keepdim=True) / qmax
    data = w / scale
    if not dtype.is_floating_point:
        data = torch.round(data)
    return torch.clamp(data, min=info.min, max=info.max).to(dtype), scale


def quantize_affine(w: torch.Tensor, bits: int, group: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8, scale, shift [rows, 1] in w's dtype) for rows of ``group``
    values (None: whole output rows): quanto's min/max scale and shift, its affine codes and
    its bit packing."""
    base = w if group is None else w.reshape(-1, group)
    rmin = torch.amin(base, dim=[1], keepdim=True)
    rmax = torch.amax(base, dim=[1], keepdim=True)
    scale = (rmax - rmin) / ((2 ** (bits - 1) - 1) - (-(2 ** (bits - 1))))
    shift = -rmin
    codes = torch.clamp(torch.round((base + shift) / scale), min=0, max=2 ** bits - 1)
    return pack(codes.to(torch.uint8), bits), scale, shift


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [R, C] -> quanto's packing [ceil(R / (8 / bits)), C]: rows [i * P, (i + 1) * P)
    in bits i * bits.. of the P packed rows (the last slice may be short)."""
    per = 8 // bits
    rows = -(-codes.shape[0] // per)
    packed = torch.zeros((rows, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(min(per, codes.shape[0] // rows + 1)):
        part = codes[i * rows:(i + 1) * rows]
        packed[:part.shape[0]] |= part << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """``pack`` undone: packed [P, C] -> uint8 codes [rows, C], row i + k * P from bits k * bits
    of packed row i."""
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * k)) & mask for k in range(8 // bits)]
    return torch.cat(parts)[:rows]


def dequantize_bits(packed, scale, shift, bits: int, shape) -> torch.Tensor:
    """[groups, 1] scale/shift over the unpacked [groups, group_size] codes -> weight ``shape``."""
    codes = unpack(packed, bits, scale.shape[0])
    return (scale * codes - shift).reshape(shape)  # same op order as quanto: bit-identical
