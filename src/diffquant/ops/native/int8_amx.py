"""The int8 dynamic product on AMX tiles through the C kernels (``csrc/int8_amx.c``): whether it
runs here, the tokens' quantization into the tiles' layout, and the product.
``ops/cpu/int8_dynamic.py`` uses it where the CPU has AMX."""

from __future__ import annotations

import torch

from . import build, registry

_state: dict = {}  # "lib": the library last asked, "amx": its answer


def amx_available() -> bool:
    """Whether the AMX int8 product runs here: built for a CPU with AMX, and Linux granted this
    process the tile registers (asked once)."""
    lib = build.library()
    if lib is None:
        return False
    if _state.get("lib") is not lib:  # asked once per loaded library
        _state["amx"], _state["lib"] = bool(lib.dq_amx_available()), lib
    return _state["amx"]


def amx_int8_supported(x2: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``amx_int8_linear`` takes bf16 tokens ``x2`` [M, K] and int8 weight ``q`` [N, K]."""
    n, k = q.shape
    return (x2.dtype == torch.bfloat16 and x2.device.type == "cpu" and q.dtype == torch.int8
            and q.is_contiguous() and x2.stride(-1) == 1 and k % 64 == 0 and n % 16 == 0
            and x2.shape[-1] == k and amx_available())


def quantize_rows_vnni(x2: torch.Tensor, xp: torch.Tensor):
    """bf16 x2 [M, K] -> (xp filled with the int8 codes in the tiles' layout, int8 [G, K / 4,
    16, 4] with G * 16 >= M: token 16 g + l's codes k..k+3 at [g, k / 4, l]; returns the scale
    float32 [M, 1]): the per-token rule of ``quantize_rows_bf16`` bit for bit. None when a
    token holds an infinity or a NaN."""
    m, k = x2.shape
    if (xp.dim() != 4 or xp.shape[0] * 16 < m or tuple(xp.shape[1:]) != (k // 4, 16, 4)
            or xp.dtype != torch.int8 or not xp.is_contiguous() or k % 4):
        raise ValueError(f"native vnni quantize: xp must be int8 [>= {(m + 15) // 16}, "
                         f"{k // 4}, 16, 4], got {xp.dtype} {list(xp.shape)}")
    scale = torch.empty(m, 1, dtype=torch.float32)
    if not registry.run("quantize_vnni", m, x=x2, ldx=x2.stride(0), k=k, xp=xp, scale=scale,
                        min_rows=16):
        return None
    return scale


def amx_int8_linear(q: torch.Tensor, xp: torch.Tensor, m: int, sx: torch.Tensor,
                    sw: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """int8 weight q [N, K] (contiguous) x the M tokens in ``xp`` (``quantize_rows_vnni``'s
    layout, at least M rounded up to 32 tokens) -> bf16 [M, N] with int8_output_bf16's
    roundings; None if the kernel could not allocate its block buffer (the caller's other path
    then runs)."""
    n, k = q.shape
    groups = xp.shape[0]
    sx, sw = sx.reshape(m).contiguous(), sw.reshape(n).contiguous()
    b = None if bias is None else bias.contiguous()
    if groups * 16 < (m + 31) // 32 * 32:
        raise ValueError(f"native AMX int8: xp holds {groups * 16} tokens, needs at least "
                         f"{(m + 31) // 32 * 32} (the {m} tokens rounded up to 32)")
    if (q.dtype != torch.int8 or not q.is_contiguous() or k % 64 or n % 16
            or tuple(xp.shape[1:]) != (k // 4, 16, 4) or xp.dtype != torch.int8):
        raise ValueError(f"native AMX int8: contiguous int8 weight [N, K] with K % 64 == 0 and "
                         f"N % 16 == 0, tokens int8 [G, K / 4, 16, 4]; got {q.dtype} "
                         f"{list(q.shape)}, {xp.dtype} {list(xp.shape)}")
    if sx.dtype != torch.float32 or sw.dtype != torch.float32 or (
            b is not None and b.dtype != torch.bfloat16):
        raise ValueError("native AMX int8: float32 scales, bf16 bias")
    y = torch.empty(m, n, dtype=torch.bfloat16)
    done = registry.run("amx_linear", (n + 31) // 32, w=q, k=k, n=n, xp=xp, groups=groups, sx=sx,
                        sw=sw, bias=b, y=y, ldy=n, m=m, min_rows=2)
    return y if done else None  # not done: no memory for a block's sums (K > 4096)
