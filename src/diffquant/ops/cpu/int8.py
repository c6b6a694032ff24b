"""int8 and float8 weights with a scale per row, prepared for ``linear.linear_weight_only``:
torchao int8wo's (the scale applied to the product of the integers: ``prepare_int8_weight``),
and those whose reference multiplies the scale into the weight (quanto int8/float8, modelopt
INT8/FP8, torchao float8: ``prepare_row_scaled``). Their routes in ``dispatch.ROUTES`` say which
kernels run: the C one-row product and torch's int8pack kernel for few rows where the format
has them, else the decode.

Each decode repeats its reference's float ops in the reference's dtype (in C for int8 into a
bf16 buffer, else chunk by chunk with torch), so the weight it writes is bit-identical; the
packed few-row kernels are held to bf16 rounding.

Example:
    >>> import torch
    >>> from diffquant.ops.cpu.dispatch import ROUTES
    >>> from diffquant.ops.cpu.linear import linear_weight_only
    >>> q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    >>> w = prepare_row_scaled(q, torch.rand(32, 1, dtype=torch.bfloat16), ROUTES["quanto int8"])
    >>> linear_weight_only(torch.randn(3, 64, dtype=torch.bfloat16), w).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch

from ..native import int8_weight as native_int8w
from ..native import registry
from .dispatch import ROUTES, Route
from .linear import PreparedWeight, _aligned
from .scratch import dequant_rows


# -- int8, one scale per output channel, applied to the product (torchao int8wo) ---------------
def prepare_int8_weight(qweight: torch.Tensor, scale: torch.Tensor,
                        route: Route = ROUTES["torchao int8wo"]) -> PreparedWeight:
    """qweight int8 [N, K], scale [N] or [N, 1] (float32 in torchao) -> PreparedWeight.

    Numbers follow ``formats.torchao.int8_weight_only_linear``: x @ q.T in x's dtype, then *
    scale cast to x's dtype (torchao's order and roundings). The packed kernel gets unit scales
    so the scale is applied the same way. bitsandbytes' int8 (``SCB`` = row absmax) is this with
    ``scale = SCB / 127``.

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
        if not native_int8w.int8_gemv_supported(q, x2) or (bias is not None
                                                           and bias.dtype != x2.dtype):
            return None
        s16 = post.get(0)
        if s16 is None:
            s16 = post[0] = scale.to(torch.bfloat16)
        return native_int8w.int8_gemv(q, None, x2, post=s16, bias=bias)

    return PreparedWeight(route, n, k, dequant_into, "int8", q.device, out_scale=scale,
                          packed=packed, one_row=one_row, float32_exact=True)


# -- int8 / float8, the scale multiplied into the weight ---------------------------------------
def prepare_row_scaled(q: torch.Tensor, scale: torch.Tensor, route: Route) -> PreparedWeight:
    """q int8 or float8 [N, K], scale [N, 1] or one value, of the reference's math dtype ->
    w = q.to(scale.dtype) * scale, as quanto (``weight._scale * weight._data``), modelopt
    (``q.to(dtype) * scale.to(dtype)``) and torchao float8 compute it; ``route`` the layer's.

    int8 with K % 16 == 0, where the route has few-row kernels (quanto's), also gets the packed
    kernel quanto itself calls for bf16 activations, ``torch._weight_int8pack_mm(x, q, scale)``
    (scale in x's dtype), and its one-row C product.
    """
    n, k = q.shape
    sdt = scale.dtype
    rows_scale = scale.reshape(-1, 1) if scale.numel() == n else None     # [N, 1] or None
    one = None if rows_scale is not None else scale.reshape(())          # per-tensor scale

    def fill(r0, r1, t):                                                  # t [R, K] in sdt
        t.copy_(q[r0:r1])
        t.mul_(rows_scale[r0:r1] if rows_scale is not None else one)

    flat_scale = scale.reshape(-1).contiguous()

    def dequant_into(out):                                                # out [N, K]
        if q.dtype == torch.int8 and registry.bf16_weight_supported(out, q, flat_scale):
            native_int8w.int8_rows_into(q, flat_scale, out)               # one pass in C
        else:
            dequant_rows(out, sdt, fill)

    packed = one_row = None
    if route.few_rows is not None and q.dtype == torch.int8 and q.device.type == "cpu" \
            and k % 16 == 0:
        per_row = scale.reshape(-1).expand(n)                             # [N]
        cast: dict = {}

        def scale_in(dtype):
            s = cast.get(dtype)
            if s is None:
                s = cast[dtype] = per_row.to(dtype).contiguous()
            return s

        def packed(x2):                                                   # [M, K] -> [M, N]
            return torch._weight_int8pack_mm(x2, _aligned(q), scale_in(x2.dtype))

        def one_row(x2, bias):  # in C: int8pack's numbers, then + bias rounded (quanto's order)
            if not native_int8w.int8_gemv_supported(q, x2) or (bias is not None
                                                               and bias.dtype != x2.dtype):
                return None
            return native_int8w.int8_gemv(q, scale_in(x2.dtype), x2, bias=bias)

    return PreparedWeight(route, n, k, dequant_into, f"{q.dtype} row-scaled", q.device,
                          packed=packed, one_row=one_row)
