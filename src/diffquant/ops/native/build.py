"""Build and load the C kernels of ``csrc/``: compiled on first use with the machine's C
compiler, cached, loaded with ctypes (``registry`` then checks the library's kernel table and
calls kernels by name; the modules beside this one wrap one C file each). The kernels split
their rows across torch's own OpenMP threads (``csrc/parallel.c``; POSIX threads of their own
where torch's runtime is not GNU OpenMP). Like torch's ops, they inherit GNU OpenMP's limit: a
process forked after they ran must ``torch.set_num_threads(1)`` (as DataLoader workers do) or
hang.

Why compiled at run time, not shipped: the code is built for the CPU it runs on
(``-march=native``: AVX-512 where there is one), needs no torch headers (a 1 s compile), and a
machine without a compiler loses nothing but speed: every caller in ``ops/cpu`` falls back to
torch ops that give the same numbers. ``DIFFQUANT_NATIVE=0`` turns the kernels off;
``DIFFQUANT_MARCH`` builds them for another x86-64 target than this CPU's (``TARGETS``: the
portable, AVX2, AVX-512 and AMX builds; one this CPU cannot execute is refused by name); ``CC``
picks the compiler; the library is cached under ``DIFFQUANT_CACHE`` (default
``~/.cache/diffquant``), keyed by the source, the flags and the CPU.

Example:
    >>> available() in (True, False)
    True
    >>> sorted(TARGETS)[:2]
    ['native', 'sapphirerapids']
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
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))  # one library of every C file
HEADERS = sorted(CSRC.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
# DIFFQUANT_MARCH's choices: the builds that -march=native gives on the CPUs the project runs
# on, each of which a newer x86-64 CPU can also execute (the tests run every one it can)
TARGETS = {
    "native": "-march=native",
    "x86-64": "-march=x86-64",                  # SSE2 only: the portable loops
    "x86-64-v3": "-march=x86-64-v3",            # AVX2, FMA, F16C: AMD Zen 3, Intel Haswell on
    "x86-64-v4": "-march=x86-64-v4",            # AVX-512 F/BW/CD/DQ/VL: Zen 4, Skylake-X on
    "sapphirerapids": "-march=sapphirerapids",  # and AVX512_BF16/VNNI/FP16, AMX
}
# The compiler's macro for each instruction set a build may use -> /proc/cpuinfo's flag for it
# (the vector and bit-manipulation sets a compiler emits on its own, and AMX, which the
# kernels call by hand)
CPU_FLAG_OF_MACRO = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm",
    "__MOVBE__": "movbe", "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw",
    "__AVX512CD__": "avx512cd", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512IFMA__": "avx512ifma",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVXVNNI__": "avx_vnni", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AMX_TILE__": "amx_tile", "__AMX_INT8__": "amx_int8",
    "__AMX_BF16__": "amx_bf16",
}
# parallel.c runs on torch's OpenMP pool when built with this (see _torch_uses_libgomp)
OPENMP = ["-fopenmp"]

class InterfaceError(RuntimeError):
    """The library's kernel table is not ``registry.KERNELS``: a source edited on one side
    only (registry.bind raises it when the library loads)."""


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


def march() -> str:
    """The target the kernels are built for: ``DIFFQUANT_MARCH``, default "native"."""
    name = os.environ.get("DIFFQUANT_MARCH", "native") or "native"
    if name not in TARGETS:
        raise ValueError(f"DIFFQUANT_MARCH={name!r} is not a build target; expected one of "
                         f"{', '.join(TARGETS)}")
    return name


def target_flags(target: str) -> list[str]:
    """The compiler flags of a build for ``target`` (a TARGETS name)."""
    return [TARGETS[target] if f == "-march=native" else f for f in FLAGS]


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def missing_features(target: str, cc: str | None = None) -> list[str]:
    """The instruction sets a build for ``target`` may use that this CPU lacks (/proc/cpuinfo's
    names); [] when it can execute it. "native" always can. Raises RuntimeError where that
    cannot be told (no compiler, no /proc/cpuinfo)."""
    if target == "native":
        return []
    have, cc = _cpu_flags(), cc or _compiler()
    if have is None or cc is None or platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"cannot tell whether this CPU executes a {target} build (needs an "
                           "x86-64 Linux machine with a C compiler)")
    done = subprocess.run([cc, TARGETS[target], "-dM", "-E", "-x", "c", os.devnull],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{cc} does not know {TARGETS[target]}: {done.stderr.strip()[-300:]}")
    macros = {ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("#define ")}
    return sorted(CPU_FLAG_OF_MACRO[m] for m in macros
                  if m in CPU_FLAG_OF_MACRO and CPU_FLAG_OF_MACRO[m] not in have)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str, flags: list[str] = FLAGS) -> Path:
    sources = [p.read_bytes() for p in [*SOURCES, *HEADERS]]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(flags).encode(), cc.encode(),
                                     platform.machine().encode(), _cpu_id().encode()]))
    name = f"diffquant_cpu-{key.hexdigest()[:16]}.so"
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
        done = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {[p.name for p in SOURCES]}: "
                               f"{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _torch_uses_libgomp() -> bool:
    """Whether torch's threads in this process are GNU OpenMP's. A -fopenmp build then joins
    that one pool: the library needs libgomp.so.1, which the loader resolves to the copy torch
    loaded. With another runtime (Intel's, LLVM's) it would be a second pool beside torch's, so
    the kernels start POSIX threads instead."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux
        return False
    # the soname itself: wheels that bundle a renamed private copy (sentencepiece's) do not count
    return any(line.endswith("/libgomp.so.1") for line in maps)


def _load():
    if os.environ.get("DIFFQUANT_NATIVE", "1") == "0":
        return None
    target, cc = march(), _compiler()
    if not cc:
        logger.info("diffquant: no C compiler found; quantized layers use the torch ops")
        return None
    _refuse_foreign(target, cc, f"DIFFQUANT_MARCH={target}")
    try:
        lib, _state["threads"] = _load_build(cc, target_flags(target))
        return lib
    except InterfaceError:  # not the machine's doing: the sources disagree, a bug to fix
        raise
    except Exception as e:  # any failure here only costs speed: say so once, then fall back
        logger.warning("diffquant: could not build the CPU kernels (%s); using the torch "
                       "ops (same numbers, slower)", e)
    return None


def _refuse_foreign(target: str, cc: str, what: str) -> None:
    """Raise naming ``what`` where this CPU cannot execute a ``target`` build: the library
    would load and then die of an illegal instruction in the first product."""
    missing = missing_features(target, cc)
    if missing:
        raise RuntimeError(f"{what}: this CPU cannot execute the {target} build of the kernels "
                           f"(it lacks {', '.join(missing)}); choose another of "
                           f"{', '.join(TARGETS)}")


def _load_build(cc: str, flags: list[str]):
    """Build with ``flags`` and load: on torch's OpenMP pool where it has one, else (or where
    that build fails) with threads of its own. Returns (library, how it threads)."""
    from .registry import bind

    variants = [flags + OPENMP, flags] if _torch_uses_libgomp() else [flags]
    for flags in variants:
        try:
            lib = bind(ctypes.CDLL(str(_build(cc, flags))))
            return lib, "torch's OpenMP pool" if OPENMP[0] in flags else "POSIX threads"
        except Exception as e:
            if flags is variants[-1] or isinstance(e, InterfaceError):
                raise
            logger.info("diffquant: no OpenMP build of the CPU kernels (%s); trying threads "
                        "of their own", e)


def build_for(target: str, cc: str | None = None, extra: tuple[str, ...] = ()):
    """The kernels built for ``target`` (a TARGETS name; ``extra`` flags added) and loaded, as
    ``library()`` loads its own: the tests run each build this CPU can execute. Raises
    RuntimeError naming what this CPU lacks where it cannot execute that build."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler: set CC")
    _refuse_foreign(target, cc, f"a {target} build")
    return _load_build(cc, target_flags(target) + list(extra))[0]


def library():
    """The loaded kernels, or None (disabled, no compiler, or the build failed: logged once)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def available() -> bool:
    return library() is not None


def threading_kind() -> str:
    """How the kernels split rows: "torch's OpenMP pool", "POSIX threads" or "off"."""
    return _state.get("threads", "off") if available() else "off"
