"""The C kernels' calling interface (``csrc/registry.c``, ``csrc/parallel.c``): every kernel by
name, with its argument list declared once here and once beside its adapter in registry.c, the
two compared when the library loads.

A kernel runs over rows [0, n) of its output, split across torch's threads in C::

    registry.run("decode", n, qtype=2, blocks=blocks, n_blocks=g, out=out, ld_out=k, out_bf16=1)

Arguments are passed by name: ``run`` puts them in the declared order, takes a tensor's
address for a pointer ("p": a tensor, or None for NULL) and refuses a missing, extra or
ill-kinded one with the kernel's name, so no call can pass arguments in the wrong order.

Example:
    >>> KERNELS["int8_rows"]
    'q:p k:i scale:p scale_step:i out:p ld:i'
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

from ..formats.gguf import BLOCK_LAYOUT, GGMLType
from . import build

# name -> its arguments after the row range, in registry.c's order ("p" a pointer, "i" an int)
KERNELS = {
    # GGUF (gguf_decode.c, gguf_gemv.c, gguf_gemv_q4.c)
    "decode": "qtype:i blocks:p n_blocks:i out:p ld_out:i out_bf16:i",
    "gemv": "qtype:i blocks:p n_blocks:i x:p out:p portable:i bf16:i k:i bias:p",
    # int8 weights (int8_weight.c)
    "int8_rows": "q:p k:i scale:p scale_step:i out:p ld:i",
    "int8_gemv": "q:p k:i scale:p x:p out:p portable:i post:p bias:p",
    "scale_rows": "y:p ldy:i n:i scale:p bias:p",
    # 4-bit weights in groups (int4.c)
    "int4_tinygemm": "packed:p k:i group:i scale:p zero:p out:p ld:i",
    "quanto_bits": "packed:p p:i g:i bits:i scale:p shift:p per:i out:p",
    "int4_gemv": "packed:p sz:p k:i group:i x:p out:p portable:i bias:p",
    # bitsandbytes NF4/FP4 (bnb4.c)
    "lut4_gemv": "packed:p lut:p absmax:p blocksize:i k:i x:p out:p portable:i bf16:i bias:p",
    "lut4_decode": "packed:p lut:p absmax:p blocksize:i k:i out:p ld:i",
    # int8 dynamic quantization (int8_dynamic.c, int8_amx.c)
    "quantize": "x:p ldx:i k:i q:p scale:p",
    "int8_output": "acc:p sx:p sw:p bias:p n:i y:p ldy:i",
    "int8_dot": "xw:p m:i q:p k:i acc:p ldacc:i",
    "int8_dynamic_row": "x:p k:i q:p sw:p bias:p y:p",
    "quantize_vnni": "x:p ldx:i k:i xp:p scale:p",
    "amx_linear": "w:p k:i n:i xp:p groups:i sx:p sw:p bias:p y:p ldy:i m:i",
    # weight quantization on load (quantize.c)
    "quanto_int8": "w:p k:i q:p scale:p",
    "quanto_affine": "w:p g:i bits:i rows:i packed:p scale:p shift:p",
    "int4_groupwise": "w:p k:i g:i packed:p scale:p zero:p",
    # bitsandbytes' and GGUF's blocks on load (quantize_blocks.c)
    "bnb4_quantize": "w:p bounds:p order:p blocksize:i packed:p absmax:p",
    "bnb_int8_quantize": "w:p k:i q:p scb:p",
    "gguf_quantize": "qtype:i w:p out:p",
    # the GGUF K-quants on load (quantize_kquant.c)
    "gguf_kquant": "qtype:i w:p dtype:i out:p",
}
MIN_ROWS_PER_THREAD = 64  # below this a thread costs more than it saves


def bind(lib):
    """Declare the entry points' types on a loaded library and check its kernel table against
    KERNELS (raising build.InterfaceError on any difference); returns the library."""
    lib.dq_run.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                           ctypes.c_int]
    lib.dq_run.restype = ctypes.c_int
    for name in ("dq_kernel_name", "dq_kernel_args"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_int], ctypes.c_char_p
    for name in ("dq_kernel_count", "dq_amx_available", "dq_int4_gemv_vector"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], ctypes.c_int
    lib.dq_gguf_block.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 3
    lib.dq_gguf_block.restype = ctypes.c_int
    lib.dq_kernels = check(lib)
    check_gguf_blocks(lib)
    return lib


def gguf_blocks(lib) -> dict:
    """{GGML type id: (values, bytes) per block} as the C decodes have them (csrc/gguf.h)."""
    table, i = {}, 0
    fields = [ctypes.c_int() for _ in range(3)]
    while lib.dq_gguf_block(i, *(ctypes.byref(f) for f in fields)) == 0:
        table[fields[0].value] = (fields[1].value, fields[2].value)
        i += 1
    return table


def check_gguf_blocks(lib) -> None:
    """The C block sizes must be formats.gguf.BLOCK_LAYOUT's, the one source of GGUF's
    facts; build.InterfaceError naming each type that differs otherwise."""
    wrong = [f"{GGMLType(t).name}: the library has {c}, formats/gguf.py {BLOCK_LAYOUT[t]}"
             for t, c in gguf_blocks(lib).items() if tuple(BLOCK_LAYOUT.get(t, ())) != c]
    if wrong:
        raise build.InterfaceError("GGUF block sizes in csrc/gguf.h and ops/formats/gguf.py "
                                   "disagree: " + "; ".join(wrong))


def check(lib) -> dict:
    """{name: (index, argument names, pointer flags, ctypes array type)} of ``lib``'s table,
    which must declare exactly KERNELS; build.InterfaceError naming every difference otherwise."""
    table = {}
    for i in range(lib.dq_kernel_count()):
        name, args = lib.dq_kernel_name(i).decode(), lib.dq_kernel_args(i).decode()
        table[name] = (i, args)
    wrong = [f"{n}: the library takes ({table[n][1]}), registry.py declares ({a})"
             for n, a in KERNELS.items() if n in table and table[n][1] != a]
    wrong += [f"{n}: declared in registry.py, not in the library"
              for n in KERNELS if n not in table]
    wrong += [f"{n}: in the library, not declared in registry.py"
              for n in table if n not in KERNELS]
    if wrong:
        raise build.InterfaceError("the C kernels' table (csrc/registry.c) and "
                                   "ops/native/registry.py disagree: " + "; ".join(wrong))
    out = {}
    for name, (index, args) in table.items():
        pairs = [a.split(":") for a in args.split()]
        out[name] = (index, tuple(p[0] for p in pairs), tuple(p[1] == "p" for p in pairs),
                     ctypes.c_int64 * len(pairs))
    return out


_trace: list | None = None  # the names of the kernels run, while ``trace`` records


@contextlib.contextmanager
def trace():
    """Records the name of every kernel run inside the block into the list it yields (the
    probe of ``python -m diffquant.ops --probe`` uses it)."""
    global _trace
    outer, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = outer


def run(name: str, n: int, /, *, lib=None, min_rows: int = MIN_ROWS_PER_THREAD,
        **args) -> bool:
    """Run kernel ``name`` over rows [0, n) on up to torch.get_num_threads() threads, each given
    at least ``min_rows``, with ``args`` its arguments by name (tensors for pointers, None for
    NULL; ints). ``lib``: another build (tests compare builds). False if the kernel asked for
    the torch fallback (return code 1)."""
    lib = lib or build.library()
    kernel = lib.dq_kernels.get(name)
    if kernel is None:
        raise ValueError(f"no C kernel {name!r}; the kernels are {sorted(KERNELS)}")
    index, names, pointer, array = kernel
    if len(args) != len(names):
        raise TypeError(f"C kernel {name} takes {', '.join(names)}; got {', '.join(args)}")
    values = []
    for arg, is_pointer in zip(names, pointer):  # a one-row product's 1%: kept to plain checks
        v = args[arg] if arg in args else _missing(name, arg, names)
        if is_pointer:
            if v is not None and not isinstance(v, torch.Tensor):
                raise TypeError(f"C kernel {name}: {arg} must be a tensor or None, got {type(v)}")
            values.append(0 if v is None else v.data_ptr())
        elif type(v) is int or type(v) is bool:
            values.append(v)
        else:
            raise TypeError(f"C kernel {name}: {arg} must be an int, got {type(v).__name__}")
    if _trace is not None:
        _trace.append(name)
    threads = max(1, min(torch.get_num_threads(), n // min_rows))
    rc = lib.dq_run(index, array(*values), n, threads)
    if rc not in (0, 1):
        raise RuntimeError(f"the C kernel {name} refused its arguments (a bug)")
    return rc == 0


def _missing(name: str, arg: str, names) -> None:
    raise TypeError(f"C kernel {name} takes {', '.join(names)}; {arg} is missing")


# -- what every kernel's tensors must be -------------------------------------------------------
def bf16_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``bias`` where a kernel can add it in C (contiguous bf16 of ``n`` values on the CPU:
    ``y.add_(bias)``'s numbers for a bf16 y), else None (the caller adds it with torch)."""
    if bias is not None and bias.dtype == torch.bfloat16 and bias.numel() == n \
            and bias.is_contiguous() and bias.device.type == "cpu":
        return bias
    return None


def bf16_weight_supported(out: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a decode into ``out`` can run here: a bf16 CPU buffer with unit column stride,
    and every stored tensor (codes, bf16 scales) contiguous on the CPU, the kernels built."""
    return (out.dtype == torch.bfloat16 and out.device.type == "cpu" and out.stride(-1) == 1
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and all(t.dtype == torch.bfloat16 for t in tensors[1:]) and build.available())


def one_row(name: str, n: int, x2: torch.Tensor, portable: bool, /, *, lib=None,
            bias: torch.Tensor | None = None, **args) -> torch.Tensor:
    """Run a one-row product ``name`` whose arguments are ``args`` plus x, out, portable, bf16
    and bias: a contiguous bf16 x goes in as it is (each thread widens it, the sums are rounded
    to bf16 and a bf16 bias added in C); any other x, or a kernel short of memory, takes
    float32 in and out, cast and given the bias by torch."""
    if x2.dtype == torch.bfloat16 and x2.is_contiguous():
        out = torch.empty(1, n, dtype=torch.bfloat16)
        in_c = bf16_bias(bias, n)
        if run(name, n, lib=lib, x=x2, out=out, portable=portable, bf16=1, bias=in_c, **args):
            return out if bias is None or in_c is not None else out.add_(bias)
    xf = x2.to(torch.float32).contiguous()
    out = torch.empty(1, n, dtype=torch.float32)
    run(name, n, lib=lib, x=xf, out=out, portable=portable, bf16=0, bias=None, **args)
    y = out.to(x2.dtype)
    return y if bias is None else y.add_(bias)
