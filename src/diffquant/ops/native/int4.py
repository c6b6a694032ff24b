"""4-bit weights in groups through the C kernels (``csrc/int4.c``): torchao int4's and quanto's
int4/int2 decodes into a bf16 buffer, and the one-row product of w = (u - 8) * scale + zero,
the form ``ops/cpu/int4.py`` gives torchao int4, quanto int4 and GGUF Q4_0 / Q4_1 / Q4_K for
torch's int4pack kernel, in a layout of its own (``pack_rows``). ``cpu/int4.int4_few_rows``
sends one bf16 row here where the kernel has its AVX2 loop (CPUs without AVX-512), and every
other row count to int4pack.

Example:
    >>> import torch
    >>> codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    >>> scale, zero = torch.rand(64, 4) / 8, torch.rand(64, 4)
    >>> packed, sz = pack_rows(codes, scale, zero)
    >>> torch.equal(unpack_rows(packed), codes)
    True
"""

from __future__ import annotations

import torch

from . import build, registry


def vector_loop() -> bool:
    """Whether the kernel runs its AVX2 loop here (built without AVX-512; on AVX-512 CPUs torch's
    int4pack kernel is the faster one-row product)."""
    lib = build.library()
    return lib is not None and bool(lib.dq_int4_gemv_vector())


def group_supported(k: int, group: int) -> bool:
    """Groups the kernel takes: 32 or a multiple of 64 (a pair of runs of 32 never straddles
    two groups), dividing K."""
    return group > 0 and k % group == 0 and (group == 32 or group % 64 == 0)


def pack_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """codes [N, K] in 0..15, scale/zero [N, K/group] -> (packed uint8 [N, K/2], sz int32
    [N, K/group]): element 2i in the low nibble of byte i, 2i + 1 in the high one, the last
    of every 8 stored xor 8 (the kernel reads it as a sign); sz the bf16 bits of scale (low
    half) and zero (high half), rounded as int4pack's scales are."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"native int4 pack: K must be a multiple of 8, got {k}")
    c = codes.to(torch.uint8).reshape(n, k // 8, 8).clone()
    c[..., 7] ^= 8
    c = c.view(n, k // 2, 2)
    packed = (c[..., 0] | (c[..., 1] << 4)).contiguous()
    sz = torch.stack([scale.to(torch.bfloat16), zero.to(torch.bfloat16)], dim=-1)
    return packed, sz.contiguous().view(torch.int32).reshape(n, -1)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """``pack_rows``' packed [N, K/2] -> the codes [N, K] in 0..15."""
    n, half = packed.shape
    c = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, half * 2 // 8, 8)
    c[..., 7] ^= 8
    return c.reshape(n, half * 2)


def scales(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_rows``' sz [N, G] -> (scale, zero) bf16 [N, G]."""
    pairs = sz.contiguous().view(torch.bfloat16).reshape(*sz.shape, 2)
    return pairs[..., 0], pairs[..., 1]


def gemv(packed: torch.Tensor, sz: torch.Tensor, group: int, x2: torch.Tensor,
         portable: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x bf16 [1, K] @ W.T (+ bias [N]) -> bf16 [1, N] for W in ``pack_rows``' layout: float32
    sums (see csrc/int4.c for their order), rounded once, then the bias added as
    ``y.add_(bias)`` would (in C where it is bf16); within bf16 rounding of int4pack's result.
    None where the kernel leaves x to the caller (a value of magnitude 2^64 or more, a NaN) or
    is short of memory. ``portable``: the scalar loop (the same bits)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if x2.shape != (1, k) or x2.dtype != torch.bfloat16 or not x2.is_contiguous() \
            or packed.dtype != torch.uint8 or not packed.is_contiguous() \
            or sz.dtype != torch.int32 or not sz.is_contiguous() or k % 32 \
            or not group_supported(k, group) or sz.shape != (n, k // group):
        raise ValueError(f"native int4 gemv: expected contiguous x bf16 [1, {k}], packed uint8 "
                         f"[{n}, {k // 2}], sz int32 [{n}, K/group] with K % 32 == 0 and group "
                         f"32 or a multiple of 64 dividing K; got x {x2.dtype} "
                         f"{list(x2.shape)}, sz {sz.dtype} {list(sz.shape)}, group {group}")
    out = torch.empty(1, n, dtype=torch.bfloat16)
    in_c = registry.bf16_bias(bias, n)
    if not registry.run("int4_gemv", n, packed=packed, sz=sz, k=k, group=group, x=x2, out=out,
                        portable=portable, bias=in_c):
        return None
    return out if bias is None or in_c is not None else out.add_(bias)


# -- decodes into a bf16 buffer (the reference's bf16 math, bit for bit) -------------------------
def int4_tinygemm_into(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
    """torchao int4: packed uint8 [N, K/2], scale/zero bf16 [N, G] -> out bf16 [N, K]."""
    n, k = out.shape
    registry.run("int4_tinygemm", n, packed=packed, k=k, group=k // scale.shape[1], scale=scale,
                 zero=zero, out=out, ld=out.stride(0))
    return out


def quanto_bits_into(packed: torch.Tensor, bits: int, scale: torch.Tensor, shift: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """quanto int4/int2: packed uint8 [P, g], scale/shift bf16 [R, 1] -> out bf16 [N, K]
    (contiguous: its rows are the R group rows of g values)."""
    n, k = out.shape
    if not out.is_contiguous():
        raise ValueError("native quanto decode writes a contiguous [N, K] buffer")
    p, g = packed.shape
    registry.run("quanto_bits", n, packed=packed, p=p, g=g, bits=bits, scale=scale, shift=shift,
                 per=k // g, out=out)
    return out
