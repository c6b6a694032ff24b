"""The C kernels of ``csrc/`` (GGUF, torchao int4, quanto and bitsandbytes 4-bit decoding;
one-row products of GGUF, int8 and 4-bit weights, the affine 4-bit one's wrappers in
``native_int4``; int8 dynamic quantization's, whose wrappers are ``native_int8``'s and
``native_amx``'s): compiled on first use with the machine's C
compiler, cached, loaded with ctypes, and split across torch's own OpenMP threads
(``csrc/parallel.c``; POSIX threads of their own where torch's runtime is not GNU OpenMP). Like torch's ops, they inherit GNU OpenMP's limit: a process
forked after they ran must ``torch.set_num_threads(1)`` (as DataLoader workers do) or hang.

Why compiled at run time, not shipped: the code is built for the CPU it runs on
(``-march=native``: AVX-512 where there is one), needs no torch headers (a 1 s compile), and a
machine without a compiler loses nothing but speed: every caller falls back to its torch ops
(``fast_gguf``, ``fast_linear``, ``fast_int8``, ``fast_formats``), which give the same
numbers. ``DIFFQUANT_NATIVE=0`` turns the kernels off; ``DIFFQUANT_MARCH`` builds them for
another x86-64 target than this CPU's (``TARGETS``: the portable, AVX2, AVX-512 and AMX
builds; one this CPU cannot execute is refused by name); ``CC`` picks the compiler; the library
is cached under ``DIFFQUANT_CACHE`` (default ``~/.cache/diffquant``), keyed by the source, the
flags and the CPU.

Example:
    >>> import torch
    >>> from diffquant.ops.formats import gguf as gd
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("gguf_decode.c", "int8_dynamic.c", "int8_weight.c", "int4.c",
                                    "quantize.c", "bnb4.c", "int8_amx.c", "parallel.c")]
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
    sources = [p.read_bytes() for p in [*SOURCES, CSRC / "bf16.h", CSRC / "kernels.h"]]
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
    variants = [flags + OPENMP, flags] if _torch_uses_libgomp() else [flags]
    for flags in variants:
        try:
            lib = bind(ctypes.CDLL(str(_build(cc, flags))))
            return lib, "torch's OpenMP pool" if OPENMP[0] in flags else "POSIX threads"
        except Exception as e:
            if flags is variants[-1]:
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


def bind(lib):
    """Declare the entry point's argument types on a loaded library; returns it."""
    lib.dq_run.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                           ctypes.c_int]
    lib.dq_run.restype = ctypes.c_int
    lib.dq_amx_available.argtypes = []
    lib.dq_amx_available.restype = ctypes.c_int
    lib.dq_int4_gemv_vector.argtypes = []
    lib.dq_int4_gemv_vector.restype = ctypes.c_int
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


def threading_kind() -> str:
    """How the kernels split rows: "torch's OpenMP pool", "POSIX threads" or "off"."""
    return _state.get("threads", "off") if available() else "off"


TYPES = (2, 3, 8, 12, 14)  # Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: the GGML ids the C file decodes


def supports(qtype, device: torch.device) -> bool:
    """Whether ``qtype`` blocks on ``device`` can use these kernels (CPU only; built)."""
    return torch.device(device).type == "cpu" and int(qtype) in TYPES and available()


# -- calling a kernel: dq_run splits its rows over threads in C --------------------------------
# parallel.c's KERNELS[] table, in its order: a kernel's id is its index here
KERNELS = ("decode", "gemv", "quantize", "int8_output", "int4_tinygemm", "int8_rows",
           "quanto_bits", "lut4_gemv", "lut4_decode", "int8_gemv", "quantize_vnni", "amx_linear",
           "scale_rows", "int8_dot", "int8_dynamic_row", "int4_gemv", "quanto_int8",
           "quanto_affine", "int4_groupwise")
(DECODE, GEMV, QUANTIZE, INT8_OUTPUT, INT4_TINYGEMM, INT8_ROWS, QUANTO_BITS, LUT4_GEMV,
 LUT4_DECODE, INT8_GEMV, QUANTIZE_VNNI, AMX_INT8_LINEAR, SCALE_ROWS, INT8_DOT,
 INT8_DYNAMIC_ROW, INT4_GEMV, QUANTO_INT8, QUANTO_AFFINE, INT4_GROUPWISE) = range(len(KERNELS))


def _run(kernel: int, n: int, *args, lib=None, min_rows: int = _MIN_ROWS_PER_THREAD) -> bool:
    """Run ``kernel`` over rows [0, n) on up to torch.get_num_threads() threads, each given at
    least ``min_rows``; ``args`` are its arguments but the row range (ints, pointers as ints,
    None for NULL), in parallel.c's order. False if the kernel asked for the torch fallback
    (return code 1)."""
    threads = max(1, min(torch.get_num_threads(), n // min_rows))
    packed = (ctypes.c_int64 * len(args))(*[0 if a is None else int(a) for a in args])
    rc = (lib or library()).dq_run(kernel, packed, n, threads)
    if rc not in (0, 1):
        raise RuntimeError(f"a diffquant native kernel ({kernel}) refused its arguments (a bug)")
    return rc == 0


_block_bytes: dict = {}  # qtype as given -> bytes per block (gguf_dequant's table, read once)


def _geometry(blocks: torch.Tensor, qtype) -> tuple[int, int]:
    size = _block_bytes.get(qtype)
    if size is None:  # the import and the enum lookup cost ~10 us: a one-row product's 1%
        from ..formats.gguf import BLOCK_LAYOUT, ggml_type
        size = _block_bytes[qtype] = BLOCK_LAYOUT[ggml_type(qtype)][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError("native GGUF kernels take contiguous uint8 blocks [N, bytes]")
    return blocks.shape[0], blocks.shape[1] // size


def decode_into(blocks: torch.Tensor, qtype, out: torch.Tensor, lib=None) -> torch.Tensor:
    """uint8 blocks [N, bytes] -> ``out`` [N, K] (float32 or bf16, rows contiguous), returned.
    Bit-identical to ``gguf_dequant.dequantize(blocks, qtype, out.dtype)``. ``lib``: another
    build of the kernels (tests compare builds)."""
    n, groups = _geometry(blocks, qtype)
    if out.dtype not in (torch.float32, torch.bfloat16) or out.stride(1) != 1:
        raise ValueError("native GGUF decode writes float32 or bf16 rows with unit stride")
    _run(DECODE, n, int(qtype), blocks.data_ptr(), groups, out.data_ptr(), out.stride(0),
         out.dtype == torch.bfloat16, lib=lib)
    return out


GEMV_TYPES = (8, 14)  # Q8_0, Q6_K: no exact int4pack mapping at 1 B/weight or less


def gemv(blocks: torch.Tensor, qtype, x2: torch.Tensor, portable: bool = False,
         lib=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ W.T (+ bias [N]) for W the Q8_0/Q6_K blocks [N, bytes] -> [1, N] in x's
    dtype, reading the blocks once.

    The weight is the reference's exact float32 values (the bf16 reference rounds them to bf16
    first: this is closer to the exact product, and within bf16 rounding of the reference); the
    sums run in float32 and are rounded once, then the bias is added as ``y.add_(bias)`` would
    (in C for a bf16 x and bias). ``portable``: the C loop without AVX-512."""
    n, groups = _geometry(blocks, qtype)
    if x2.shape[0] != 1 or int(qtype) not in GEMV_TYPES:
        raise ValueError("native GGUF gemv takes Q8_0/Q6_K blocks and one row")
    return _one_row(GEMV, n, (int(qtype), blocks.data_ptr(), groups), x2, portable,
                    (x2.shape[1],), lib=lib, bias=bias)


def bf16_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``bias`` where a kernel can add it in C (contiguous bf16 of ``n`` values on the CPU:
    ``y.add_(bias)``'s numbers for a bf16 y), else None (the caller adds it with torch)."""
    if bias is not None and bias.dtype == torch.bfloat16 and bias.numel() == n \
            and bias.is_contiguous() and bias.device.type == "cpu":
        return bias
    return None


def _one_row(kernel: int, n: int, head: tuple, x2: torch.Tensor, portable: bool,
             tail: tuple = (), lib=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run a one-row product whose arguments are ``head``, x, out, portable, bf16, ``tail``,
    bias: a contiguous bf16 x goes in as it is (each thread widens it, the sums are rounded to
    bf16 and a bf16 bias added in C); any other x, or a kernel short of memory, takes float32
    in and out, cast and given the bias by torch."""
    if x2.dtype == torch.bfloat16 and x2.is_contiguous():
        out = torch.empty(1, n, dtype=torch.bfloat16)
        in_c = bf16_bias(bias, n)
        if _run(kernel, n, *head, x2.data_ptr(), out.data_ptr(), portable, 1, *tail,
                None if in_c is None else in_c.data_ptr(), lib=lib):
            return out if bias is None or in_c is not None else out.add_(bias)
    xf = x2.to(torch.float32).contiguous()
    out = torch.empty(1, n, dtype=torch.float32)
    _run(kernel, n, *head, xf.data_ptr(), out.data_ptr(), portable, 0, *tail, None, lib=lib)
    y = out.to(x2.dtype)
    return y if bias is None else y.add_(bias)


def bf16_rows_supported(w: torch.Tensor) -> bool:
    """Whether a weight quantization kernel of wquant_cpu.c takes ``w``: contiguous bf16 rows
    on the CPU, no autograd, the kernels built."""
    return w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() \
        and not w.requires_grad and available()


# -- integer weights into a bf16 buffer (the reference's bf16 math, bit for bit) ----------------
def bf16_weight_supported(out: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a bf16 decode into ``out`` can run here: a bf16 CPU buffer with unit column
    stride, and every stored tensor (codes, bf16 scales) contiguous on the CPU."""
    return (out.dtype == torch.bfloat16 and out.device.type == "cpu" and out.stride(-1) == 1
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and all(t.dtype == torch.bfloat16 for t in tensors[1:]) and available())


def int4_tinygemm_into(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """torchao int4: packed uint8 [N, K/2], scale/zero bf16 [N, G] -> out bf16 [N, K]."""
    n, k = out.shape
    _run(INT4_TINYGEMM, n, packed.data_ptr(), k, k // scale.shape[1], scale.data_ptr(),
         zero.data_ptr(), out.data_ptr(), out.stride(0))
    return out


def int8_rows_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] times a bf16 scale per row ([N] / [N, 1]) or one -> out bf16 [N, K]."""
    n, k = out.shape
    step = 1 if scale.numel() == n else 0
    _run(INT8_ROWS, n, q.data_ptr(), k, scale.data_ptr(), step, out.data_ptr(), out.stride(0))
    return out


def scale_rows_supported(y: torch.Tensor, scale: torch.Tensor, bias) -> bool:
    """Whether ``scale_rows_`` takes this output, scale and bias."""
    return (y.dtype == torch.bfloat16 and y.device.type == "cpu" and y.dim() == 2
            and y.stride(1) == 1 and scale.dtype == torch.bfloat16
            and (bias is None or bias.dtype == torch.bfloat16) and available())


def scale_rows_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place, bf16 y [M, N] (rows contiguous): y * scale [N] then + bias [N], each rounded to
    bf16 as torch's ``y.mul_(scale).add_(bias)`` does, in one pass; returns y."""
    m, n = y.shape
    s = scale.reshape(n).contiguous()
    b = None if bias is None else bias.reshape(n).contiguous()  # held: pointers used below
    _run(SCALE_ROWS, m, y.data_ptr(), y.stride(0), n, s.data_ptr(),
         None if b is None else b.data_ptr())
    return y


def int8_gemv_supported(q: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether ``int8_gemv`` runs this product at full speed: one bf16 row on the CPU, int8
    rows of K % 64 == 0 (the vector loop's step), the kernels built."""
    return (x2.shape[0] == 1 and x2.dtype == torch.bfloat16 and x2.device.type == "cpu"
            and q.dtype == torch.int8 and q.device.type == "cpu" and q.is_contiguous()
            and q.shape[1] % 64 == 0 and available())


def int8_gemv(q: torch.Tensor, scale: torch.Tensor | None, x2: torch.Tensor,
              portable: bool = False, post: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x bf16 [1, K] @ (int8 q [N, K]).T times a bf16 ``scale`` [N] -> bf16 [1, N]: the numbers
    of ``torch._weight_int8pack_mm(x, q, scale)`` (a float32 sum per row, times the scale,
    rounded once), reading q in place at memory speed. ``scale`` None: 1. Then, in the same
    call, each rounded to bf16 as torch's ``y.mul_(post)`` / ``y.add_(bias)``: times ``post``
    and plus ``bias`` (bf16 [N]) where given. ``portable``: the loop without AVX-512."""
    n, k = q.shape
    vectors = [("scale", scale), ("post", post), ("bias", bias)]
    if x2.shape != (1, k) or x2.dtype != torch.bfloat16 or q.dtype != torch.int8 \
            or not q.is_contiguous() or any(v is not None and (v.dtype != torch.bfloat16
                                                               or v.numel() != n)
                                            for _, v in vectors):
        raise ValueError(f"native int8 gemv: expected x bf16 [1, {k}], contiguous int8 q "
                         f"[{n}, {k}], bf16 scale / post / bias of {n} values")
    xb = x2.contiguous()                                  # widened in C, by each thread
    held = [None if v is None else v.contiguous() for _, v in vectors]  # pointers used below
    out = torch.empty(1, n, dtype=torch.bfloat16)
    s, p, b = (None if v is None else v.data_ptr() for v in held)
    if not _run(INT8_GEMV, n, q.data_ptr(), k, s, xb.data_ptr(), out.data_ptr(), portable, p, b):
        raise MemoryError(f"native int8 gemv: no memory to widen a row of {k} values")
    return out


def quanto_bits_into(packed: torch.Tensor, bits: int, scale: torch.Tensor, shift: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """quanto int4/int2: packed uint8 [P, g], scale/shift bf16 [R, 1] -> out bf16 [N, K]
    (contiguous: its rows are the R group rows of g values)."""
    n, k = out.shape
    if not out.is_contiguous():
        raise ValueError("native quanto decode writes a contiguous [N, K] buffer")
    p, g = packed.shape
    _run(QUANTO_BITS, n, packed.data_ptr(), p, g, bits, scale.data_ptr(), shift.data_ptr(),
         k // g, out.data_ptr())
    return out


# -- bitsandbytes 4-bit ---------------------------------------------------------------------------
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
    return _one_row(LUT4_GEMV, n, (p.data_ptr(), lut.data_ptr(), absmax.data_ptr(), blocksize, k),
                    x2, portable, bias=bias)


def lut4_decode_into(packed: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor,
                     blocksize: int, out: torch.Tensor) -> torch.Tensor:
    """bitsandbytes NF4/FP4 weight -> out bf16 [N, K] (unit column stride): bf16(code value *
    absmax), bitsandbytes' dequantize_4bit into a reused buffer. ``lut``/``absmax`` float32."""
    n, k = out.shape
    if out.dtype != torch.bfloat16 or out.stride(1) != 1 or k % 2:
        raise ValueError("native 4-bit decode writes bf16 rows of even length with unit stride")
    p = packed.contiguous().view(torch.uint8)
    _run(LUT4_DECODE, n, p.data_ptr(), lut.data_ptr(), absmax.data_ptr(), blocksize, k,
         out.data_ptr(), out.stride(0))
    return out
