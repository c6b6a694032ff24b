"""Memory facts a budget is planned and checked with: sizes ("16GB"), this process's resident
memory (now and its high-water mark), what a component folder takes once loaded, and the
activations of each phase of a Flux-style run (text encoding, denoising, VAE decode).

The activation formulas are calibrated by measurement (bench/vae_memory.py for the decode,
bench/budget.py for the rest); they are estimates, checked against measured peaks by the tests
and the bench, not bounds.

Example:
    >>> parse_memory("16GB"), parse_memory("1.5GiB"), parse_memory(1000), parse_memory("1000")
    (16000000000, 1610612736, 1000, 1000)
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import re
from pathlib import Path

import torch

from ..errors import ConfigError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
GB = 10**9


def parse_memory(size, what: str = "max_memory") -> int:
    """Bytes of ``size``: an int, or "16GB" / "16 GiB" / "800MB" (GB = 10^9, GiB = 2^30, as
    accelerate reads max_memory)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{what}={size!r}: expected a positive int of bytes or a string such as "
                          "'16GB', '8GiB' or '800MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


# -- this process ------------------------------------------------------------------------------
def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS; the high-water mark where /proc is absent)."""
    now = _status("VmRSS")
    return now if now is not None else peak_resident_bytes()


def peak_resident_bytes() -> int:
    """This process's resident high-water mark (VmHWM, else ru_maxrss)."""
    peak = _status("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_memory() -> None:
    """Hand freed memory back: collect cycles, return glibc's free heap pages to the system
    (freed tensors under its mmap threshold otherwise stay resident and the next load adds to
    them) and empty the accelerator's cache."""
    from ..ops.cpu.scratch import clear_scratch

    clear_scratch()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator returns memory by its own rules
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None and hasattr(torch, acc.type):
        getattr(torch, acc.type).empty_cache()


# -- what a folder takes once loaded -----------------------------------------------------------
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_table(folder: Path) -> dict[str, tuple[str, tuple]]:
    """{key: (safetensors dtype, shape)} of every weight file in ``folder``, from the headers."""
    table = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        table.update(tensor_table_of(path))
    if not table:
        raise ConfigError(f"{folder}: no .safetensors weights to size; a budget needs "
                          "safetensors folders (diffquant quantize writes them)")
    return table


def tensor_table_of(path: Path) -> dict[str, tuple[str, tuple]]:
    """{key: (dtype, shape)} of one safetensors file, from its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def loaded_bytes(folder: Path, dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes the component holds once loaded, its largest tensor's bytes) for the folder's
    weights: integer tensors (quantized blocks, codes) as stored, floats in ``dtype`` (the
    load casts them) or as stored where ``dtype`` is None."""
    total = largest = 0
    for kind, shape in tensor_table(folder).values():
        size = _ITEMSIZE.get(kind, 4)
        if kind.startswith(("F", "BF")) and not kind.startswith("F8") and dtype is not None:
            size = torch.empty((), dtype=dtype).element_size()
        n = math.prod(shape) * size
        total, largest = total + n, max(largest, n)
    return total, largest


# -- activations of each phase ------------------------------------------------------------------
def _cfg(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def encode_activations(folder: Path, tokens: int, batch: int, itemsize: int) -> int:
    """A text encoder's live tensors for ``tokens`` per prompt: the hidden states, a
    feed-forward's width and one layer's attention scores (transformers' eager attention)."""
    cfg = _cfg(folder)
    d = cfg.get("d_model") or cfg.get("hidden_size") or 768
    ff = cfg.get("d_ff") or cfg.get("intermediate_size") or 4 * d
    heads = cfg.get("num_heads") or cfg.get("num_attention_heads") or 12
    return batch * tokens * (6 * d + 2 * ff + 3 * heads * tokens) * itemsize


def denoise_activations(folder: Path, image_tokens: int, text_tokens: int, batch: int,
                        itemsize: int, quantized: bool | None = None) -> int:
    """A Flux transformer step's live tensors: ~32 [S, D] tensors at once (a single block's
    [S, 5D] concatenation, its 4D-wide MLP, q/k/v, the residual streams; S = image + text
    tokens; calibrated on bench.budget's small scale), plus the decoded weight of
    the largest quantized layer that the CPU paths keep in one reused buffer (bf16 and the
    float32 copy the product takes). ``quantized``: whether the layers will be (None: as the
    folder's config says; a planner sizing a float source for a quantized run says True)."""
    cfg = _cfg(folder)
    d = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    s = image_tokens + text_tokens
    live = batch * s * 32 * d * itemsize
    if quantized is None:
        quantized = bool(cfg.get("quantization_config"))
    scratch = 5 * d * d * 6 if quantized else 0
    return live + scratch


# A decode's activations, per channel of the decoder's widest full-resolution stage
# (block_out_channels[0]) in float32: a fixed part and a part per output pixel, fitted to
# FLUX.1's VAE (128 channels) in bench/vae_memory.py: 3.78 GB above the weights for 1024 x 1024
# whole, 0.41 GB for a tile of 256 px (0.99 GB measured for 512 px tiles, 1.08 predicted).
DECODE_PER_PIXEL_CHANNEL = (3.78 - 0.41) * GB / (1024 * 1024 - 256 * 256) / 128
DECODE_FIXED_PER_CHANNEL = 0.41 * GB / 128 - DECODE_PER_PIXEL_CHANNEL * 256 * 256
# What a process holds more after its first run than after loading, whatever the phase: the
# code pages of the kernels first used and the allocator's state (measured: ~30 MB on the
# tests' pipeline, on x86-64 Linux).
RUN_OVERHEAD = 0.03 * GB
def decode_activations(folder: Path, height: int, width: int, batch: int, itemsize: int,
                       tile: int | None = None) -> int:
    """A VAE decode's live tensors for ``batch`` images of height x width pixels, whole or in
    ``tile`` pixel tiles (a tile's activations, plus the whole output image the tiles blend
    into)."""
    cfg = _cfg(folder)
    channels = (cfg.get("block_out_channels") or [128])[0]
    scale = channels * itemsize / 4
    fixed = int(DECODE_FIXED_PER_CHANNEL * scale)
    if tile is None:
        return int(batch * height * width * DECODE_PER_PIXEL_CHANNEL * scale) + fixed
    tiles_out = batch * height * width * 3 * itemsize * 2   # the tiles and the joined image
    return int(min(tile, height) * min(tile, width) * DECODE_PER_PIXEL_CHANNEL * scale) \
        + tiles_out + fixed


def run_baseline(index: dict) -> int:
    """This process's resident bytes once it has imported what a run of the pipeline imports
    (diffquant's backends, the pipeline, the components' transformers classes): the memory a
    run holds before its first component loads."""
    import importlib

    from .. import quantizers  # noqa: F401 - every backend's library
    from ..pipeline_components import PIPELINE_CLASSES, import_class

    if index.get("_class_name") in PIPELINE_CLASSES:
        import_class(index["_class_name"], PIPELINE_CLASSES)
    for entry in index.values():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
            getattr(importlib.import_module("transformers"), entry[1], None)
    return resident_bytes()
