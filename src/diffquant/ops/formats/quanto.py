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

bf16 weights on a CPU go through ``csrc/wquant_cpu.c`` (the same ops, one pass per row, the
codes written packed: the torch ops were 5 of 6.6 s of that load); other dtypes and devices
through torch.

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

from ..native import build as native


def supported(w: torch.Tensor, group: int | None) -> bool:
    """Whether these functions reproduce quanto for ``w`` [out, in]: more than one row to
    quantize along (quanto switches to one scale per tensor otherwise)."""
    rows = w.shape[0] if group is None else w.numel() // group
    return w.dim() == 2 and rows > 1 and (group is None or w.shape[1] % group == 0)


def quantize_symmetric(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] of ``dtype`` (int8 or float8_e4m3fn), scale [N, 1] in w's
    dtype): quanto's absmax scale per output row and its symmetric quantization."""
    if dtype == torch.int8 and _in_c(w):                    # the same ops, one pass per row
        n, k = w.shape
        q = torch.empty(n, k, dtype=torch.int8)
        scale = torch.empty(n, 1, dtype=torch.bfloat16)
        native._run(native.QUANTO_INT8, n, w.data_ptr(), k, q.data_ptr(), scale.data_ptr(),
                    min_rows=16)
        return q, scale
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
    if _in_c(base):                                         # the same ops, one pass per row
        r, g = base.shape
        rows = -(-r // (8 // bits))                         # pack's rows
        packed = torch.empty(rows, g, dtype=torch.uint8)
        scale, shift = (torch.empty(r, 1, dtype=torch.bfloat16) for _ in range(2))
        native._run(native.QUANTO_AFFINE, rows, base.data_ptr(), g, bits, r, packed.data_ptr(),
                    scale.data_ptr(), shift.data_ptr(), min_rows=8)
        return packed, scale, shift
    rmin = torch.amin(base, dim=[1], keepdim=True)
    rmax = torch.amax(base, dim=[1], keepdim=True)
    scale = (rmax - rmin) / ((2 ** (bits - 1) - 1) - (-(2 ** (bits - 1))))
    shift = -rmin
    codes = torch.clamp(torch.round((base + shift) / scale), min=0, max=2 ** bits - 1)
    return pack(codes.to(torch.uint8), bits), scale, shift


def _in_c(w: torch.Tensor) -> bool:
    """wquant_cpu.c's case (``native.bf16_rows_supported``)."""
    return native.bf16_rows_supported(w)


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
