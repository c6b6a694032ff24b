"""int8 weights with a scale per row through the C kernels (``csrc/int8_weight.c``): their decode
into a bf16 buffer, their one-row product read in place (torchao int8wo, quanto int8), and
torchao int8's output scale and bias as one pass. ``ops/cpu/int8.py`` and ``ops/cpu/linear.py``
use them.

Example:
    >>> import torch
    >>> q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    >>> scale = torch.rand(16, dtype=torch.bfloat16)
    >>> out = torch.empty(16, 64, dtype=torch.bfloat16)
    >>> if registry.bf16_weight_supported(out, q, scale):
    ...     assert torch.equal(int8_rows_into(q, scale, out), q.to(torch.bfloat16) * scale[:, None])
"""

from __future__ import annotations

import torch

from . import build, registry


def int8_rows_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] times a bf16 scale per row ([N] / [N, 1]) or one -> out bf16 [N, K]."""
    n, k = out.shape
    registry.run("int8_rows", n, q=q, k=k, scale=scale, scale_step=1 if scale.numel() == n else 0,
                 out=out, ld=out.stride(0))
    return out


def scale_rows_supported(y: torch.Tensor, scale: torch.Tensor, bias) -> bool:
    """Whether ``scale_rows_`` takes this output, scale and bias."""
    return (y.dtype == torch.bfloat16 and y.device.type == "cpu" and y.dim() == 2
            and y.stride(1) == 1 and scale.dtype == torch.bfloat16
            and (bias is None or bias.dtype == torch.bfloat16) and build.available())


def scale_rows_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place, bf16 y [M, N] (rows contiguous): y * scale [N] then + bias [N], each rounded to
    bf16 as torch's ``y.mul_(scale).add_(bias)`` does, in one pass; returns y."""
    m, n = y.shape
    s = scale.reshape(n).contiguous()
    b = None if bias is None else bias.reshape(n).contiguous()
    registry.run("scale_rows", m, y=y, ldy=y.stride(0), n=n, scale=s, bias=b)
    return y


def int8_gemv_supported(q: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether ``int8_gemv`` runs this product at full speed: one bf16 row on the CPU, int8
    rows of K % 64 == 0 (the vector loop's step), the kernels built."""
    return (x2.shape[0] == 1 and x2.dtype == torch.bfloat16 and x2.device.type == "cpu"
            and q.dtype == torch.int8 and q.device.type == "cpu" and q.is_contiguous()
            and q.shape[1] % 64 == 0 and build.available())


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
    s, p, b = (None if v is None else v.contiguous() for _, v in vectors)
    out = torch.empty(1, n, dtype=torch.bfloat16)
    if not registry.run("int8_gemv", n, q=q, k=k, scale=s, x=x2.contiguous(), out=out,
                        portable=portable, post=p, bias=b):
        raise MemoryError(f"native int8 gemv: no memory to widen a row of {k} values")
    return out
