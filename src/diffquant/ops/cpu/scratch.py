"""Reused buffers of the fast CPU paths (one pool per thread) and chunked dequantization.

A layer's forward on a CPU needs a few big temporaries of the same shapes every call (the
decoded weight, widened activations, int32 sums); fresh allocations of that size cost page
faults each time, so they come from here.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import torch

_CHUNK_BYTES = 4 << 20  # a dequantization chunk's float32 temporary: stays in the L2/L3 caches


# -- the reusable dequantization buffer ----------------------------------------------------------
_scratch = threading.local()  # one pool per thread: two threads never share a buffer


def scratch_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   tag: str = "weight") -> torch.Tensor:
    """A tensor of ``shape`` over memory that later calls with the same (dtype, device, tag) get
    back; it grows to the largest shape asked for and is never shrunk (``clear_scratch`` frees).

    Layers run one after another, so all layers share one buffer per purpose: the memory cost is
    one dequantized weight of the largest layer, not one per layer. Fresh allocations of this
    size cost page faults on every call, which is what this saves.
    """
    pool = getattr(_scratch, "pool", None)
    if pool is None:
        pool = _scratch.pool = {}
    key = (dtype, torch.device(device), tag)
    numel = math.prod(shape)
    flat = pool.get(key)
    if flat is None or flat.numel() < numel:
        # A tensor made under inference_mode is an inference tensor: writing it later outside
        # that mode (under no_grad, say) raises. The pool outlives the mode, so it never is one.
        with torch.inference_mode(False):
            flat = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def clear_scratch() -> None:
    """Free this thread's dequantization buffers (they are re-made on the next call)."""
    _scratch.pool = {}


def chunk_rows(n: int, k: int, work_dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk of ``dequant_rows``: all of them off the CPU (one kernel launch each)."""
    if torch.device(device).type != "cpu":
        return n
    return min(n, max(1, _CHUNK_BYTES // (k * work_dtype.itemsize)))


def dequant_rows(out: torch.Tensor, work_dtype: torch.dtype,
                 fill: Callable[[int, int, torch.Tensor], None]) -> torch.Tensor:
    """Fill ``out`` [N, K] in row chunks: ``fill(r0, r1, t)`` writes rows r0:r1 into ``t``
    [r1 - r0, K] of ``work_dtype``, which is then cast into ``out``.

    Why chunks: on a CPU the few passes of a dequantization then run over one cache-sized chunk
    instead of the whole weight, and only the final write reaches memory. Elementwise torch ops
    are only vectorised when all operands share one dtype, so the math runs in ``work_dtype`` and
    the casts are plain copies.
    """
    n, k = out.shape
    rows = chunk_rows(n, k, work_dtype, out.device)
    direct = out.dtype == work_dtype
    tmp = None if direct else scratch_buffer((rows, k), work_dtype, out.device, "chunk")
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        t = out[r0:r1] if direct else tmp[: r1 - r0]
        fill(r0, r1, t)
        if not direct:
            out[r0:r1].copy_(t)
    return out
