"""Fast weight-only linear kernels as plain functions: same numbers as the reference math, less
time (int8 dynamic quantization is ``fast_int8.py``; 4-bit group formats' few-row products and
torchao int4's prepared weight ``fast_int4.py``).

Every format's reference forward (``ops/int_quant.py``, ``ops/gguf_dequant.py``) dequantizes the
whole weight into a fresh tensor, often through float32 temporaries, and then multiplies. Here
**weight-only formats** pick a path by the number of rows ``M`` of the input:

  * ``M <= w.small_rows`` on a CPU: torch's packed CPU kernels where the format maps onto them
    exactly (``torch._weight_int8pack_mm``; ``aten._weight_int4pack_mm_for_cpu`` for any format
    whose values are ``(u - 8) * scale + zero`` per group of 32+ columns). The packing is derived
    from the stored layout once, by a ``prepare_*`` function, at load time.
  * otherwise: one vectorised dequantization into a scratch bf16/fp16/fp32 buffer that is reused
    across calls and layers of the same shape (per thread, per device), then one matmul; on a
    CPU without a bf16 matmul kernel (``float32_product``) the decoded weight and x are widened
    to float32 and multiplied there, 5-6x faster than torch's bf16 loop.

A layer prepares its weight once and calls one function per forward::

    w = prepare_int8_weight(qweight, scale)      # at load time
    y = linear_weight_only(x, w, bias)           # every forward

Numbers agree with the reference dequantize-then-matmul at bf16 rounding level (the packed
kernels accumulate in float32 and round once, with scales rounded to the activation dtype).

Example:
    >>> import torch
    >>> from diffquant.ops.formats import torchao as iq
    >>> q, s = iq.int8_quantize_per_channel(torch.randn(64, 128))
    >>> x = torch.randn(5, 128, dtype=torch.bfloat16)
    >>> y = linear_weight_only(x, prepare_int8_weight(q, s))
    >>> torch.equal(y, iq.int8_weight_only_linear(x, q, s))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ...errors import QuantizationError
from ..native import int8_weight as native_int8w
# clear_scratch is re-exported: callers of these paths free the buffer pool through this module
from .scratch import clear_scratch, scratch_buffer  # noqa: F401

# Up to this many rows the packed CPU kernels beat dequantize + matmul. Crossovers measured with
# 2 threads at 3072x3072: int8 ~16 rows (its dequantization is a mere cast), int4 formats ~64-96,
# GGUF Q8_0 (two int4 products) ~32-48. Re-measure with python -m bench.kernels --rows 16 32 64.
SMALL_ROWS = 16
INT4_SMALL_ROWS = 64
# the packed kernels are slow in float32, and 10-100x slower in float16 than in bf16 (no FP16
# arithmetic on AVX-512 CPUs before Sapphire Rapids): float16 activations take the dequantize path
_PACKED_DTYPES = (torch.bfloat16,)


# -- which dtype a CPU's many-row product runs in -------------------------------------------------
_float32_faster: dict = {}


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


def _linear_float32(x2: torch.Tensor, w: "PreparedWeight", bias) -> torch.Tensor:
    """``linear_weight_only``'s many-row product in float32: the weight decoded in x's dtype
    (the reference's values, exactly) and widened, x widened, one rounding to x's dtype."""
    n, k = w.out_features, w.in_features
    wf = scratch_buffer((n, k), torch.float32, x2.device, "weight f32")
    if w.float32_exact:  # the decode gives the same values in any dtype (int8 codes)
        w.dequant_into(wf)
    else:
        buf = scratch_buffer((n, k), x2.dtype, x2.device)
        w.dequant_into(buf)
        wf.copy_(buf)
    if w.out_scale is None:
        return _matmul_float32(x2, wf, bias)
    return _scale_rows_out(_matmul_float32(x2, wf, None), w, bias)


def _matmul_float32(x2: torch.Tensor, wf: torch.Tensor, bias) -> torch.Tensor:
    """x2 [M, K] @ wf.T (float32 [N, K]) + bias in float32, rounded once to x2's dtype."""
    xf = scratch_buffer(x2.shape, torch.float32, x2.device, "x f32").copy_(x2)
    yf = scratch_buffer((x2.shape[0], wf.shape[0]), torch.float32, x2.device, "y f32")
    if bias is not None:
        torch.addmm(bias.to(torch.float32), xf, wf.t(), out=yf)
    else:
        torch.mm(xf, wf.t(), out=yf)
    return yf.to(x2.dtype)


def linear_decoded(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for a weight decoded into a buffer of x's dtype, multiplied in
    float32 where ``float32_product(x)`` says that is faster (one rounding, as torch's loop)."""
    if not float32_product(x):
        return F.linear(x, w, bias)
    wf = scratch_buffer(w.shape, torch.float32, w.device, "weight f32").copy_(w)
    y = _matmul_float32(x.reshape(-1, w.shape[1]), wf, bias)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _weight_buffer(x: torch.Tensor, shape) -> torch.Tensor:
    # Autograd would save the buffer for backward and the next call would overwrite it.
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    return scratch_buffer(shape, x.dtype, x.device)


# -- weight-only formats -------------------------------------------------------------------------
@dataclass
class PreparedWeight:
    """A quantized weight ready for ``linear_weight_only``; made by a ``prepare_*`` function.

    ``dequant_into(out)`` writes the [N, K] weight into ``out`` (any float dtype);
    ``out_scale`` ([N] float32 or None) multiplies the matmul result (int8 keeps the reference
    order: matmul on the integers, then the per-channel scale); ``packed(x2d)`` is the packed
    CPU kernel for few rows (None where the format has no exact mapping or off the CPU);
    ``make_packed()`` builds it on the first few-row call instead (``lazy=True`` of the
    ``prepare_*`` functions), so only layers called with few rows pay its memory.
    ``float32_exact``: ``dequant_into`` a float32 buffer gives exactly the values it gives in
    bf16 (integer codes), so the float32 product need not decode in bf16 first.
    ``one_row(x2, bias)``: the whole product of one row, ``out_scale`` and ``bias`` included,
    in one native call (None back where it does not take this row); a packed kernel that has
    one (its ``one_row`` attribute) brings it when it is built.
    """

    out_features: int
    in_features: int
    dequant_into: Callable[[torch.Tensor], None]
    out_scale: torch.Tensor | None = None
    packed: Callable[[torch.Tensor], torch.Tensor] | None = None
    small_rows: int = SMALL_ROWS
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    make_packed: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    float32_exact: bool = False
    one_row: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None = None
    _scale_casts: dict = field(default_factory=dict, repr=False)  # dtype -> out_scale in it

    def __post_init__(self):
        if self.one_row is None:
            self.one_row = getattr(self.packed, "one_row", None)

    def out_scale_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``out_scale`` cast to ``dtype``, cast once per dtype."""
        s = self._scale_casts.get(dtype)
        if s is None:
            s = self._scale_casts[dtype] = self.out_scale.to(dtype)
        return s

    def packed_kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``packed``, built now from ``make_packed`` if it was left for the first use."""
        if self.packed is None and self.make_packed is not None:
            self.packed, self.make_packed = self.make_packed(), None
            if self.one_row is None:
                self.one_row = getattr(self.packed, "one_row", None)
        return self.packed

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The [N, K] weight in a fresh tensor, out_scale applied (for a layer's dequantize)."""
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.device)
        self.dequant_into(out)
        return out if self.out_scale is None else (out * self.out_scale[:, None]).to(dtype)


def linear_weight_only(x: torch.Tensor, w: PreparedWeight, bias: torch.Tensor | None = None,
                       small_rows: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a prepared quantized weight; x [..., K] -> y [..., N] in x.dtype.

    ``x`` is already in the compute dtype. Few rows (``<= small_rows``, default the weight's)
    go to the packed kernel when there is one, the rest dequantize into a reused buffer.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats import torchao as iq
        >>> q, s = iq.int8_quantize_per_channel(torch.randn(32, 64))
        >>> w = prepare_int8_weight(q, s)
        >>> linear_weight_only(torch.randn(2, 3, 64, dtype=torch.bfloat16), w).shape
        torch.Size([2, 3, 32])
    """
    if x.shape[-1] != w.in_features:
        raise QuantizationError(f"fast linear ({w.name}): input has {x.shape[-1]} features, the "
                                f"weight expects {w.in_features}")
    x2 = x.reshape(-1, w.in_features)                                    # [M, K]
    limit = w.small_rows if small_rows is None else small_rows
    few = x2.shape[0] <= limit and x.dtype in _PACKED_DTYPES and x.device.type == "cpu" \
        and not (torch.is_grad_enabled() and x.requires_grad)
    if few and x2.shape[0] == 1:
        if w.one_row is None and w.make_packed is not None:
            w.packed_kernel()                          # a lazy kernel may bring its one_row
        if w.one_row is not None:
            y = w.one_row(x2, bias)
            if y is not None:
                return y.reshape(*x.shape[:-1], w.out_features)
    if few and w.packed_kernel() is not None:
        y = w.packed(_aligned(x2))                                        # [M, N] in x.dtype
    elif float32_product(x):
        return _linear_float32(x2, w, bias).reshape(*x.shape[:-1], w.out_features)
    else:
        buf = _weight_buffer(x, (w.out_features, w.in_features))          # [N, K] in x.dtype
        w.dequant_into(buf)
        if w.out_scale is None:  # on the 2-D view: F.linear of a 3-D input without a bias took
            # 3.4-4.5x as long in a Flux forward at 256 and 1024 tokens x 3072 (torch 2.13, CPU)
            return F.linear(x2, buf, bias).reshape(*x.shape[:-1], w.out_features)
        y = torch.mm(x2, buf.t())                                         # [M, N]
    if w.out_scale is not None:
        y = _scale_rows_out(y, w, bias)
    elif bias is not None:
        y = y.add_(bias)
    return y.reshape(*x.shape[:-1], w.out_features)


def _scale_rows_out(y: torch.Tensor, w: "PreparedWeight", bias) -> torch.Tensor:
    """In place: y [M, N] <- y * w.out_scale [N], then + bias: the reference's two roundings.

    The scale is cast to y's dtype first, as torchao does (``m * scale.to(m.dtype)``): the same
    numbers as torchao for any stored scale, and a same-dtype product is vectorised (a bf16 x
    float32 one is not: 3x slower at 1280 x 3072). The cast is kept per dtype: redone on every
    call it was a torch op (~5-10 us) in each one-row product."""
    s = w.out_scale_in(y.dtype)
    if native_int8w.scale_rows_supported(y, s, bias):  # both ops in one pass, the same bits
        return native_int8w.scale_rows_(y, s, bias)
    y.mul_(s)
    return y if bias is None else y.add_(bias)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # torch's packed CPU kernels read with aligned vector loads (see quantizers/quanto.py)
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(
        memory_format=torch.contiguous_format)


# -- int8, one scale per output channel (torchao int8wo, quanto int8, bitsandbytes int8) ---------
def prepare_int8_weight(qweight: torch.Tensor, scale: torch.Tensor,
                        small_rows: int = SMALL_ROWS) -> PreparedWeight:
    """qweight int8 [N, K], scale [N] or [N, 1] (float32 in torchao) -> PreparedWeight.

    Numbers follow ``int_quant.int8_weight_only_linear``: x @ q.T in x's dtype, then * scale
    cast to x's dtype (torchao's order and roundings). The packed kernel gets unit scales so the
    scale is applied the same way. bitsandbytes' int8 (``SCB`` = row absmax) is this with ``scale = SCB / 127``.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats import torchao as iq
        >>> q, s = iq.int8_quantize_per_channel(torch.randn(32, 64))
        >>> prepare_int8_weight(q, s).out_features
        32
    """
    n, k = qweight.shape
    scale = scale.reshape(n).to(torch.float32)
    q = qweight

    def dequant_into(out):                                                # out [N, K]
        out.copy_(q)

    packed = None
    # _weight_int8pack_mm returns wrong numbers when K is not a multiple of 16 (torch 2.13)
    if q.device.type == "cpu" and k % 16 == 0:
        ones = {}

        def packed(x2):                                                   # [M, K] -> [M, N]
            unit = ones.get(x2.dtype)
            if unit is None:
                unit = ones[x2.dtype] = torch.ones(n, dtype=x2.dtype)
            return torch._weight_int8pack_mm(x2, _aligned(q), unit)  # a copy only if misaligned

    post = {}

    def one_row(x2, bias):  # sum, channel scale (cast to bf16 as torchao) and bias: one C call
        if not native_int8w.int8_gemv_supported(q, x2) or (bias is not None and bias.dtype != x2.dtype):
            return None
        s16 = post.get(0)
        if s16 is None:
            s16 = post[0] = scale.to(torch.bfloat16)
        return native_int8w.int8_gemv(q, None, x2, post=s16, bias=bias)

    return PreparedWeight(n, k, dequant_into, scale, packed, small_rows, "int8", q.device,
                          float32_exact=True, one_row=one_row)
