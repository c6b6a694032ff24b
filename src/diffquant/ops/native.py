"""The C kernels of ``csrc/gguf_cpu.c``: compiled on first use with the machine's C compiler,
cached, loaded with ctypes, and split across threads here.

Why compiled at run time, not shipped: the code is built for the CPU it runs on
(``-march=native``: AVX-512 where there is one), needs no torch headers (a 1 s compile), and a
machine without a compiler loses nothing but speed: every caller falls back to the torch ops of
``fast_gguf`` / ``gguf_dequant``, which give the same numbers. ``DIFFQUANT_NATIVE=0`` turns the
kernels off; ``CC`` picks the compiler; the library is cached under ``DIFFQUANT_CACHE`` (default
``~/.cache/diffquant``), keyed by the source, the flags and the CPU.

Example:
    >>> import torch
    >>> from diffquant.ops import gguf_dequant as gd
    >>> blocks = gd.quantize(torch.randn(4, 64), "Q8_0")
    >>> out = torch.empty(4, 64)
    >>> if available():
    ...     _ = decode_into(blocks, gd.GGMLType.Q8_0, out)
    ...     assert torch.equal(out, gd.dequantize(blocks, "Q8_0"))
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gguf_cpu.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
_MIN_ROWS_PER_THREAD = 64  # below this a thread costs more than it saves

_lock = threading.Lock()
_state: dict = {}          # "lib": the loaded library or None once a build failed


def _cache_dir() -> Path:
    root = os.environ.get("DIFFQUANT_CACHE") or Path.home() / ".cache" / "diffquant"
    return Path(root) / "native"


def _cpu_id() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(),
                                     platform.machine().encode(), _cpu_id().encode()]))
    name = f"gguf_cpu-{key.hexdigest()[:16]}.so"
    target = _cache_dir() / name
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build in the temporary directory instead
        user = getattr(os, "getuid", lambda: 0)()
        target = Path(tempfile.gettempdir()) / f"diffquant-native-{user}" / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    # compile beside the target and rename: a concurrent loader never sees half a library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    if os.environ.get("DIFFQUANT_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        logger.info("diffquant: no C compiler found; GGUF layers use the torch ops")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except Exception as e:  # any failure here only costs speed: say so once, then fall back
        logger.warning("diffquant: could not build the GGUF CPU kernels (%s); using the "
                       "torch ops (same numbers, slower)", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dq_decode.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ctypes.c_int]
    lib.dq_decode.restype = ctypes.c_int
    return lib


def library():
    """The loaded kernels, or None (disabled, no compiler, or the build failed: logged once)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def available() -> bool:
    return library() is not None


TYPES = (2, 3, 8, 12, 14)  # Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: the GGML ids the C file decodes


def supports(qtype, device: torch.device) -> bool:
    """Whether ``qtype`` blocks on ``device`` can use these kernels (CPU only; built)."""
    return torch.device(device).type == "cpu" and int(qtype) in TYPES and available()


# -- threads: ctypes drops the GIL during a call, so rows split across a small pool ----------
_pool: dict = {}


def _run_split(n: int, call) -> None:
    """call(r0, r1) over [0, n) in torch.get_num_threads() parts, this thread taking one."""
    parts = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    if parts == 1:
        _check(call(0, n))
        return
    pool = _pool.get(parts - 1)
    if pool is None:
        pool = _pool.setdefault(parts - 1, ThreadPoolExecutor(parts - 1, "diffquant-native"))
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    _check(call(bounds[0], bounds[1]))
    for f in futures:
        _check(f.result())


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError("diffquant native GGUF kernel refused its arguments (a bug)")


def _geometry(blocks: torch.Tensor, qtype) -> tuple[int, int]:
    from .gguf_dequant import BLOCK_LAYOUT, ggml_type
    _, size = BLOCK_LAYOUT[ggml_type(qtype)]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError("native GGUF kernels take contiguous uint8 blocks [N, bytes]")
    return blocks.shape[0], blocks.shape[1] // size


def decode_into(blocks: torch.Tensor, qtype, out: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [N, bytes] -> ``out`` [N, K] (float32 or bf16, rows contiguous), returned.
    Bit-identical to ``gguf_dequant.dequantize(blocks, qtype, out.dtype)``."""
    lib = library()
    n, groups = _geometry(blocks, qtype)
    if out.dtype not in (torch.float32, torch.bfloat16) or out.stride(1) != 1:
        raise ValueError("native GGUF decode writes float32 or bf16 rows with unit stride")
    src, dst, ld = blocks.data_ptr(), out.data_ptr(), out.stride(0)
    bf16 = int(out.dtype == torch.bfloat16)
    _run_split(n, lambda r0, r1: lib.dq_decode(int(qtype), src, groups, r0, r1, dst, ld, bf16))
    return out

