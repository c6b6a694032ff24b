"""Which kernel a quantized layer runs on a CPU: the whole answer, in one table.

A quantized layer's forward on a CPU (``QuantizedLinear.use_fast_path``: a CPU tensor, no
autograd, not traced by torch.compile) prepares its stored weight once, for its row of ROUTES
below (``int8``, ``int4``, ``gguf``: ``prepare_*``), and multiplies with ``linear.linear`` (int8
dynamic: ``int8_dynamic.linear_int8_dynamic``; bitsandbytes 4-bit: ``int4.linear_lut4``). What
runs then depends on three things:

1. the stored format: the layer's row of ROUTES;
2. M, the rows (tokens) of x, for bf16 activations:

       M == 1       one_row:  a C product that reads the stored weight in place and adds the
                              bias in the same call (memory-bound: one read of the weight)
       M <= few     few_rows: torch's packed int8 kernel, on the stored int8 weight (no
                              route keeps a copy of its weight in another layout: a layer
                              holds its stored pieces only, tests/test_held_memory.py)
       otherwise    decode:   the weight decoded into one reused bf16 buffer (a C pass, else
                              the reference's torch ops), then one matmul: in bf16, or in
                              float32 where torch has no bf16 matmul kernel ("bf16 matmul")

   A slot left empty, or whose kernel needs what this machine lacks, passes its rows on to
   the next one down; other activation dtypes always decode;
3. this machine: CAPABILITIES, what the CPU and this build of the C kernels can do.

``bias`` says how a route adds the bias, as its reference does: "fused" (F.linear(x, w, b):
one rounding), "after" (the product rounded, then + bias), "scaled" (int8's product of the
integers, then * the channel scale, then + bias). ``python -m diffquant.ops`` prints this
table and what runs here at 1, 4 and 256 rows (``predict``); ``--probe`` runs one layer per
scheme and reports what ran, and tests/test_dispatch.py checks the two agree on every build
this machine executes.

Example:
    >>> ROUTES["torchao int8wo"].few
    16
    >>> predict("gguf:q8_0", 1) in ("C gemv", "mm(float32)", "addmm(bfloat16)")
    True
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ..native import build
from ..native import int4 as native_int4
from ..native import int8_amx as native_amx


# -- CAPABILITIES: what this machine can do ------------------------------------------------------
def _int_mm_slow() -> bool:
    """Whether torch._int_mm on this CPU is a generic loop: without VNNI (AVX2 only: AMD Zen 3,
    older Intel) it took 4.4x the bf16 product and 22x the float32 one at 1280 x 3072 x 3072
    (Zen 3 core pair, torch 2.13). Zen 4 and the AMX Xeons, with VNNI, run it at 0.5-0.8x bf16."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # VNNI is x86's; elsewhere torch's own choice stands (not measured here)
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return vnni is not None and not vnni()


_float32_faster: dict = {}  # dtype -> whether float32_product holds on this CPU


def float32_product(x: torch.Tensor) -> bool:
    """Whether a many-row product of ``x``'s (bf16 or fp16) values is faster done in float32.

    True on a CPU where torch has no oneDNN kernel for the dtype (no AVX-512 or AMX: AMD Zen 3,
    Intel before Cooper Lake): torch's bf16 matmul is then a generic loop, 5-6x slower than its
    float32 one (1280 x 3072 x 3072: 1.4 s against 0.27 s on a Zen 3 core pair, torch 2.13).
    That loop sums in float32 and rounds once, as the float32 product of the same values
    rounded once does: the numbers differ only by the order of the sums.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or (
            torch.is_grad_enabled() and x.requires_grad):
        return False
    fast = _float32_faster.get(x.dtype)
    if fast is None:
        probe = {torch.bfloat16: "_is_mkldnn_bf16_supported",
                 torch.float16: "_is_mkldnn_fp16_supported"}[x.dtype]
        check = getattr(torch.ops.mkldnn, probe, None)
        fast = _float32_faster[x.dtype] = check is not None and not check()
    return fast


CAPABILITIES = {  # name: (whether this machine has it, what it is)
    "C kernels": (lambda: build.available(),
                  "the C kernels are built (a C compiler, DIFFQUANT_NATIVE not 0)"),
    "AVX2, no AVX-512": (lambda: native_int4.vector_loop(),
                         "the build's 4-bit one-row loop (AVX-512 builds decode that row)"),
    "AMX": (lambda: native_amx.amx_available(), "AMX tiles, granted to this process by Linux"),
    "VNNI": (lambda: not _int_mm_slow(), "torch._int_mm is fast (VNNI)"),
    "no VNNI": (lambda: _int_mm_slow(), "torch._int_mm is a generic loop (AVX2 only)"),
    "bf16 matmul": (lambda: not float32_product(torch.zeros(1, dtype=torch.bfloat16)),
                    "torch has a bf16 matmul kernel (AVX-512 BF16 / AMX); else float32's"),
}


def has(capability: str) -> bool:
    return CAPABILITIES[capability][0]()


# -- the kernels -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """One slot's work: ``name`` as the probe reports it ("C gemv": a kernel of
    native/registry.py; otherwise a torch op and its dtype; " + " between the steps), the
    CAPABILITIES it needs, and what else it takes of the weight (for the reader)."""

    name: str
    needs: tuple[str, ...] = ()
    takes: str = ""

    def runs(self) -> bool:
        """Whether this machine runs it."""
        return all(has(n) for n in self.needs)


C = ("C kernels",)
INT8_GEMV = Kernel("C int8_gemv", C, "K % 64 == 0")
INT8PACK = Kernel("_weight_int8pack_mm(bfloat16)", (), "K % 16 == 0")
INT4_GEMV = Kernel("C int4_gemv", (*C, "AVX2, no AVX-512"), "groups of 32 or 64n; its layout "
                   "made per call in the shared buffer")
GGUF_GEMV = Kernel("C gemv", C)
TORCH = None  # a slot's work done by the reference's torch ops (none of them a "work" op)


@dataclass(frozen=True)
class Route:
    """How one stored format runs on a CPU (see the module docstring)."""

    stored: str                        # what the layer holds
    schemes: tuple[str, ...]           # the CLI schemes that store it
    one_row: Kernel | None = None      # M == 1
    few_rows: Kernel | None = None     # M <= few
    few: int = 0
    decode: Kernel | None = TORCH      # more rows: into the buffer, then one matmul
    bias: str = "fused"                # "fused", "after" or "scaled" (the module docstring)
    products: tuple[Kernel, ...] = ()  # int8 dynamic's product for more rows: the first that runs
    library: str = ""                  # the layer keeps its library's or reference forward: its ops
    without_c: str = ""                # what the layer runs where the C kernels are not built
    per_call: str = ""                 # a torch op every fast call runs beside its kernel


# int8 dynamic's integer product for more rows: the first of these this machine runs (without
# the C kernels its quantization and output scaling are torch ops with the same bits)
INT8_DYNAMIC_PRODUCTS = (
    Kernel("C quantize_vnni + C amx_linear", ("AMX",), "K % 64 == 0, N % 16 == 0"),
    Kernel("C quantize + _int_mm(int8) + C int8_output", ("VNNI",)),
    Kernel("C quantize + C int8_dot + C int8_output", C),
    Kernel("mm(float32)"),  # exact float32 sums over 1024 columns at a time
)


# -- ROUTES: stored format -> its kernels ---------------------------------------------------------
ROUTES = {
    "torchao int8wo": Route(
        "int8 [N, K], float32 scale per row", ("torchao:int8wo",),
        one_row=INT8_GEMV, few_rows=INT8PACK, few=16, bias="scaled"),
    "torchao int8dq": Route(
        "int8 [N, K], float32 scale per row; tokens quantized per call", ("torchao:int8dq",),
        one_row=Kernel("C int8_dynamic_row", (*C, "no VNNI")), bias="scaled",
        products=INT8_DYNAMIC_PRODUCTS),
    "torchao int4wo": Route(
        "uint4 pairs [N, K/2], bf16 scale and zero per group", ("torchao:int4wo",),
        one_row=INT4_GEMV, few=1, decode=Kernel("C int4_tinygemm", C), bias="after"),
    "torchao float8wo": Route(
        "float8 [N, K], float32 scale per row",
        ("torchao:float8wo", "torchao:float8wo_e5m2", "torchao:float8wo_e4m3"), bias="after"),
    "quanto int8": Route(
        "int8 [N, K], scale per row in the model's dtype", ("quanto:int8",),
        one_row=INT8_GEMV, few_rows=INT8PACK, few=16, decode=Kernel("C int8_rows", C),
        bias="after"),
    "quanto float8": Route("float8 [N, K], scale per row", ("quanto:float8",), bias="after"),
    "quanto int4": Route(
        "uint4 [N*K/g/2, g] (quanto's packing), scale and shift per group", ("quanto:int4",),
        decode=Kernel("C quanto_bits", C), bias="after"),
    "quanto int2": Route(
        "uint2 [N*K/g/4, g] (quanto's packing), scale and shift per group", ("quanto:int2",),
        decode=Kernel("C quanto_bits", C), bias="after"),
    "gguf Q8_0": Route(
        "GGUF blocks: 32 int8 and an f16 scale", ("gguf:q8_0",),
        one_row=GGUF_GEMV, few=1, decode=Kernel("C decode", C)),
    "gguf Q6_K": Route(
        "GGUF super-blocks of 256: 6-bit codes, int8 scales per 16", ("gguf:q6_k",),
        one_row=GGUF_GEMV, few=1, decode=Kernel("C decode", C)),
    "gguf Q4_0 Q4_1 Q4_K": Route(
        "GGUF blocks of 4-bit codes, a scale (and min) per 32", ("gguf:q4_0", "gguf:q4_1",
                                                                 "gguf:q4_k"),
        one_row=GGUF_GEMV, few=1, decode=Kernel("C decode", C)),
    "gguf other": Route(
        "GGUF F32 / F16 / BF16, Q5_0 / Q5_1, Q2_K / Q3_K / Q5_K",
        ("gguf:f32", "gguf:f16", "gguf:bf16", "gguf:q5_0", "gguf:q5_1", "gguf:q5_k")),
    "modelopt INT8": Route("int8 [N, K], scale per row or tensor", ("modelopt:int8",),
                           decode=Kernel("C int8_rows", C)),
    "modelopt FP8": Route("float8 [N, K], scale per row or tensor", ("modelopt:fp8",)),
    "modelopt blocks": Route(
        "INT4 / NF4 / NVFP4 in blocks", ("modelopt:int4", "modelopt:nf4", "modelopt:nvfp4"),
        library="addmm(bfloat16)"),  # the reference per call: dequantize, F.linear in x's dtype
    "bitsandbytes 4-bit": Route(  # without the C kernels: bitsandbytes.matmul_4bit's op
        "NF4 / FP4 codes [N*K/2], float32 absmax per 64", ("bitsandbytes:nf4", "bitsandbytes:fp4"),
        one_row=Kernel("C lut4_gemv", C), few=1, decode=Kernel("C lut4_decode", C),
        without_c="gemm_4bit(bfloat16)"),
    "bitsandbytes 4-bit, double quantization": Route(  # the absmax expanded per call, as
        "NF4 / FP4 codes [N*K/2], int8 absmax per 64, float32 per 256 of those",  # bitsandbytes
        ("bitsandbytes:nf4-dq", "bitsandbytes:fp4-dq"),
        one_row=Kernel("C lut4_gemv", C), few=1, decode=Kernel("C lut4_decode", C),
        without_c="gemm_4bit(bfloat16)", per_call="dequantize_blockwise(uint8)"),
    "bitsandbytes int8": Route(
        "int8 [N, K], SCB (absmax) per row", ("bitsandbytes:int8",),
        library="int8_vectorwise_quant(float16) + int8_mixed_scaled_mm(bfloat16)"),
}


def route_of(scheme: str) -> Route:
    """The route of a CLI scheme ("gguf:q8_0")."""
    for route in ROUTES.values():
        if scheme in route.schemes:
            return route
    raise KeyError(f"no CPU route for scheme {scheme!r}")


# -- what runs here --------------------------------------------------------------------------------
def predict(scheme: str, rows: int) -> str:
    """What ``scheme``'s layer runs on this machine for ``rows`` bf16 rows, in the probe's
    words (``cpu_paths.probe``): its C kernels, then torch's work ops with their dtype."""
    route = route_of(scheme)
    if route.library:
        steps = route.library
    elif route.without_c and not has("C kernels"):
        steps = route.without_c
    elif route.products:
        one = route.one_row if rows == 1 and route.one_row.runs() else None
        steps = (one or next(p for p in route.products if p.runs())).name
    else:
        steps = " + ".join(_weight_only_steps(route, rows))
    names = [s for s in steps.split(" + ") if has("C kernels") or not s.startswith("C ")]
    ordered = [s for s in names if s.startswith("C ")] + [s for s in names
                                                          if not s.startswith("C ")]
    return " + ".join(dict.fromkeys(ordered)) or "torch elementwise ops"


def _weight_only(route: Route, rows: int) -> str:
    """The slot of ``route`` that takes ``rows`` rows here: "one_row", "few_rows" or "decode"."""
    if rows == 1 and rows <= route.few and route.one_row is not None and route.one_row.runs():
        return "one_row"
    if rows <= route.few and route.few_rows is not None and route.few_rows.runs():
        return "few_rows"
    return "decode"


def _weight_only_steps(route: Route, rows: int) -> list[str]:
    """``route``'s steps for ``rows`` rows, torch's ops in the order they run."""
    per_call = [route.per_call] if route.per_call else []
    return per_call + _slot_steps(route, rows)


def _slot_steps(route: Route, rows: int) -> list[str]:
    slot = _weight_only(route, rows)
    if slot == "one_row":
        return [route.one_row.name]
    steps = [route.few_rows.name] if slot == "few_rows" else []
    if slot == "decode":
        if route.decode is not None and route.decode.runs():
            steps.append(route.decode.name)
        dtype = "bfloat16" if has("bf16 matmul") else "float32"
        steps.append(f"{'addmm' if route.bias == 'fused' else 'mm'}({dtype})")
    if route.bias == "scaled":  # the channel scale and the bias in one C pass
        steps.append("C scale_rows")
    return steps


def cpu_products() -> str:
    """Which many-row products this machine runs, in one line (the benchmarks' headers print
    it: the tables of two machines differ by it)."""
    weight_only = "bf16" if has("bf16 matmul") else \
        "float32 (torch has no bf16 matmul kernel here)"
    amx, int_mm, dot, _ = INT8_DYNAMIC_PRODUCTS
    int8 = "AMX tiles" if amx.runs() else "torch._int_mm" if int_mm.runs() else \
        "the AVX2 int8 dot kernel" if dot.runs() else "exact float32 matmuls"
    return f"many-row products: weight-only in {weight_only}, int8 dynamic on {int8}"


# -- the table for a reader: python -m diffquant.ops ---------------------------------------------
ROWS = (1, 4, 256)  # a modulation layer's one row, a few, a block of image tokens


def machine() -> str:
    """This CPU's relevant instruction sets, torch's bf16 matmul kernel and the build of the C
    kernels, in one line."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
           if f in flags]
    return (f"{platform.processor() or platform.machine()}: {' '.join(isa) or 'no AVX2'}; "
            f"torch bf16 matmul kernel: {'yes' if has('bf16 matmul') else 'no'}; "
            f"C kernels: {build.march() if build.available() else 'off'} build, "
            f"{build.threading_kind()}")


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _cell(kernel: Kernel) -> str:
    needs = [n for n in kernel.needs if n != "C kernels"]
    note = ", ".join([*needs, *([kernel.takes] if kernel.takes else [])])
    mark = "" if kernel.runs() else " (not here)"
    return f"{kernel.name}{f' [{note}]' if note else ''}{mark}"


def _cells(r: Route) -> list[str]:
    """A route's one row, few rows, more rows and bias cells."""
    if r.library:
        return ["-", "-", f"its own forward: {r.library}", "-"]
    few = f"{_cell(r.few_rows)}, up to {r.few} rows" if r.few_rows else "-"
    more = "the first of: " + "; ".join(map(_cell, r.products)) if r.products else \
        _cell(r.decode) if r.decode else "torch ops"
    return [_cell(r.one_row) if r.one_row else "-", few, more, r.bias]


def describe() -> str:
    """ROUTES as a Markdown table, the capabilities of this machine, and what runs here for
    every scheme at ``ROWS`` bf16 rows (``predict``)."""
    caps = "; ".join(f"{name}: {'yes' if has(name) else 'no'}" for name in CAPABILITIES)
    routes = [[name, r.stored, " ".join(r.schemes), *_cells(r)] for name, r in ROUTES.items()]
    schemes = [s for r in ROUTES.values() for s in r.schemes]
    here = [[f"`{s}`", *(predict(s, m) for m in ROWS)] for s in schemes]
    return "\n".join([
        machine(), f"capabilities: {caps}", "",
        *markdown(["route", "stores", "schemes", "one row", "few rows", "more rows (decode)",
                   "bias"], routes), "",
        "What runs here, bf16 activations (python -m diffquant.ops --probe measures it):", "",
        *markdown(["scheme", *(f"{m} row{'s' if m > 1 else ''}" for m in ROWS)], here)])
