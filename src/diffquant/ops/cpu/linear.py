"""The product of a prepared weight-only quantized weight on a CPU: ``linear_weight_only`` runs
one row, few rows or many rows as the weight's route in ``dispatch.ROUTES`` says, with the
numbers of the format's reference forward (``ops/formats``): the same bits where it decodes,
within bf16 rounding in the packed kernels (they sum in float32 and round once, with scales
rounded to the activations' dtype).

A layer prepares its weight once (a ``prepare_*`` function of ``int8``, ``int4`` or ``gguf``,
at its first forward on a CPU) and calls one function per forward::

    w = int8.prepare_int8_weight(qweight, scale)   # once
    y = linear_weight_only(x, w, bias)             # every forward

Many rows decode into one buffer reused across calls and layers of the same shape (per thread,
per device: ``scratch``), then one matmul; where torch has no bf16 matmul kernel
(``dispatch.float32_product``) the decoded weight and x are widened to float32 and multiplied
there, 5-6x faster than torch's bf16 loop.

Example:
    >>> import torch
    >>> from diffquant.ops.cpu.int8 import prepare_int8_weight
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
from .dispatch import Route, float32_product
# clear_scratch is re-exported: callers of these paths free the buffer pool through this module
from .scratch import clear_scratch, scratch_buffer  # noqa: F401

# the packed kernels are slow in float32, and 10-100x slower in float16 than in bf16 (no FP16
# arithmetic on AVX-512 CPUs before Sapphire Rapids): float16 activations take the dequantize path
_PACKED_DTYPES = (torch.bfloat16,)


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


# -- a prepared weight ----------------------------------------------------------------------------
@dataclass
class Packed:
    """A few-row kernel: ``run(x2)`` x [M, K] -> [M, N] in x's dtype; ``one_row(x2, bias)``,
    where it has one, the C product of one row with the bias added in the same call (None back
    where it does not take this row, which then goes to ``run``)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    one_row: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None = None

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self.run(x2)


@dataclass
class PreparedWeight:
    """A quantized weight ready for ``linear_weight_only``; made by a ``prepare_*`` function.

    ``route``: its row of ``dispatch.ROUTES`` (``small_rows`` defaults to its ``few``; its
    ``bias`` says where the bias goes). ``dequant_into(out)`` writes the [N, K] weight into
    ``out`` (any float dtype); ``out_scale`` ([N] float32 or None) multiplies the matmul result
    (int8 keeps the reference order: matmul on the integers, then the per-channel scale);
    ``packed`` is the few-row kernel (a ``Packed`` or a function; None where the format has
    none or off the CPU: only int8's, which reads the stored weight); ``make_packed()`` builds
    it on the first few-row call instead. Neither may keep a copy of the weight: a layer holds
    its stored pieces only (tests/test_held_memory.py). ``float32_exact``: ``dequant_into`` a float32 buffer gives exactly the
    values it gives in bf16 (integer codes), so the float32 product need not decode in bf16
    first. ``one_row(x2, bias)``: the whole product of one row, ``out_scale`` and ``bias``
    included, in one native call (None back where it does not take this row); a ``Packed``
    that has one brings it when it is built.
    """

    route: Route
    out_features: int
    in_features: int
    dequant_into: Callable[[torch.Tensor], None]
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_scale: torch.Tensor | None = None
    packed: Callable[[torch.Tensor], torch.Tensor] | None = None
    make_packed: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    one_row: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None = None
    float32_exact: bool = False
    small_rows: int | None = None
    _scale_casts: dict = field(default_factory=dict, repr=False)  # dtype -> out_scale in it

    def __post_init__(self):
        if self.small_rows is None:
            self.small_rows = self.route.few
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


def linear(x: torch.Tensor, w: PreparedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A quantized layer's forward on a CPU: ``linear_weight_only`` with the bias added as the
    weight's route says its reference adds it (``dispatch.Route.bias``)."""
    return linear_weight_only(x, w, bias, bias_after=w.route.bias == "after")


def linear_weight_only(x: torch.Tensor, w: PreparedWeight, bias: torch.Tensor | None = None,
                       small_rows: int | None = None, bias_after: bool = False) -> torch.Tensor:
    """y = x @ W.T + bias for a prepared quantized weight; x [..., K] -> y [..., N] in x.dtype.

    ``x`` is already in the compute dtype. One row goes to the weight's one-row kernel, few
    rows (``<= small_rows``, default the weight's) to its packed kernel when there is one, the
    rest dequantize into a reused buffer (``dispatch``). The bias is added in the product where
    the path can (one rounding); ``bias_after``: to the rounded product (two).

    Example:
        >>> import torch
        >>> from diffquant.ops.cpu.int8 import prepare_int8_weight
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
    after = bias is not None and bias_after
    if few and x2.shape[0] == 1:
        if w.one_row is None and w.make_packed is not None:
            w.packed_kernel()                          # a lazy kernel may bring its one_row
        if w.one_row is not None:  # the bias added in C, as y.add_(bias): right for every route
            y = w.one_row(x2, bias)
            if y is None and after:  # a bias the kernel does not take: torch adds it after
                y = w.one_row(x2, None)
                y = None if y is None else y.add_(bias)
            if y is not None:
                return y.reshape(*x.shape[:-1], w.out_features)
    y = _product(x, x2, w, None if after else bias, few)                 # [M, N] in x.dtype
    return (y.add_(bias) if after else y).reshape(*x.shape[:-1], w.out_features)


def _product(x: torch.Tensor, x2: torch.Tensor, w: PreparedWeight, bias, few: bool):
    """x2 [M, K] @ W.T with ``bias`` (None, or added as one rounding or after the scale) by
    the packed kernel (``few``) or the decode, in float32 where that is faster -> [M, N]."""
    if few and w.packed_kernel() is not None:
        y = w.packed(_aligned(x2))                                        # [M, N] in x.dtype
    elif float32_product(x):
        return _linear_float32(x2, w, bias)
    else:
        buf = _weight_buffer(x, (w.out_features, w.in_features))          # [N, K] in x.dtype
        w.dequant_into(buf)
        if w.out_scale is None:  # on the 2-D view: F.linear of a 3-D input without a bias took
            # 3.4-4.5x as long in a Flux forward at 256 and 1024 tokens x 3072 (torch 2.13, CPU)
            return F.linear(x2, buf, bias)
        y = torch.mm(x2, buf.t())                                         # [M, N]
    if w.out_scale is not None:
        return _scale_rows_out(y, w, bias)
    return y if bias is None else y.add_(bias)


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
