"""Measure a run: seconds and peak resident memory of each phase (encode, denoise, decode).

The peaks are the kernel's high-water mark (VmHWM), reset at each phase's start by writing 5
to /proc/self/clear_refs (Linux); elsewhere only the whole run's peak is known. Measure in a
fresh process: a process's first high-water mark includes whatever it did before.

Example:
    >>> stats = measure_call(pipe, "a cat", num_inference_steps=2)   # doctest: +SKIP
    >>> stats["peak"], stats["phases"]["denoise"]["seconds"]          # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from . import memory

_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Reset this process's high-water mark to its resident memory now; False if impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Phases:
    def __init__(self):
        self.stats, self.current, self.start = {}, None, 0.0

    def enter(self, name: str) -> None:
        self.close()
        self.current, self.start = name, time.perf_counter()
        reset_peak()

    def close(self) -> None:
        if self.current is not None:
            self.stats[self.current] = {"seconds": time.perf_counter() - self.start,
                                        "peak": memory.peak_resident_bytes()}
            self.current = None


def measure_call(pipe, *args, **kwargs) -> dict:
    """Run ``pipe(*args, **kwargs)``; returns {"output", "peak", "baseline", "phases": {name:
    {"seconds", "peak"}}} with the phases encode (prompt to embeddings), denoise (the
    transformer's load and steps) and decode (the VAE)."""
    phases = _Phases()
    encode, vae_decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*a, **k):
        if phases.current is None:
            phases.enter("encode")
        out = encode(*a, **k)
        phases.enter("denoise")
        return out

    def timed_decode(*a, **k):
        phases.enter("decode")
        return vae_decode(*a, **k)

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    baseline = memory.resident_bytes()
    try:
        output = pipe(*args, **kwargs)
        phases.close()
    finally:
        del pipe.encode_prompt
        pipe.vae.decode = vae_decode
    peaks = [p["peak"] for p in phases.stats.values()]
    return {"output": output, "baseline": baseline, "phases": phases.stats,
            "peak": max(peaks + [memory.peak_resident_bytes()])}
