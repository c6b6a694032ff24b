"""Quantization on load, in less time: the C kernels (``native/quantize.py``: quanto, torchao
int4, bitsandbytes NF4/FP4 and LLM.int8(), GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants
Q4_K/Q5_K/Q6_K; and int8 dynamic's
token quantizer for int8 per-channel weights) where they take the weight, bf16 on a CPU, else
the reference functions (``ops/formats``, bitsandbytes' own). The same codes and scales either way, bit for
bit (tests/test_native.py and tests/test_quanto_math.py compare them over special values).

Why: the reference recipes are six to ten bf16 torch passes over a weight; on a 2-core AVX2
machine quanto's were 5 of the 6.6 s of quantizing a 1.16B-parameter transformer on load,
torchao int4's 5.8 of 6.5, torchao int8's the same share.

Example:
    >>> import torch
    >>> from diffquant.ops.formats import torchao as iq
    >>> w = torch.randn(64, 128, dtype=torch.bfloat16)
    >>> all(torch.equal(a, b) for a, b in zip(int4_quantize_groupwise(w, 32),
    ...                                       iq.int4_quantize_groupwise(w, 32)))
    True
"""

from __future__ import annotations

import torch

from ..formats import gguf as gg
from ..formats import quanto as qm
from ..formats import torchao as iq
from ..native import int8_dynamic as native_int8
from ..native import quantize as native_quantize


# -- torchao --------------------------------------------------------------------------------------
def int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``formats.torchao.int8_quantize_per_channel``: a big bf16 weight [N, K] on a CPU in one
    C pass (int8 dynamic's per-token rule is this per-row one)."""
    if w.dim() == 2 and w.numel() > iq._CHUNK and w.device.type == "cpu" \
            and native_int8.int8_supported(w) and w.stride(1) == 1:
        done = native_int8.quantize_rows_bf16(w, torch.empty(w.shape, dtype=torch.int8))
        if done is not None:  # None: a row holds an infinity or a NaN
            return done
    return iq.int8_quantize_per_channel(w)


def int4_quantize_groupwise(w: torch.Tensor, group_size: int):
    """``formats.torchao.int4_quantize_groupwise``: bf16 rows on a CPU in one C pass per group
    (an even group size dividing K; the reference raises for any other)."""
    k = w.shape[-1]
    if k % group_size == 0 and k % 2 == 0 and _int4_in_c(w, group_size):
        return native_quantize.int4_groupwise(w, group_size)
    return iq.int4_quantize_groupwise(w, group_size)


def _int4_in_c(w: torch.Tensor, group_size: int) -> bool:
    """csrc/quantize.c's case: an even group of bf16 rows it takes."""
    return group_size % 2 == 0 and native_quantize.bf16_rows_supported(w)


# -- quanto ---------------------------------------------------------------------------------------
def quantize_symmetric(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``formats.quanto.quantize_symmetric``: int8 of bf16 rows on a CPU in one C pass."""
    if dtype == torch.int8 and _in_c(w):
        return native_quantize.quanto_int8(w)
    return qm.quantize_symmetric(w, dtype)


def quantize_affine(w: torch.Tensor, bits: int, group: int | None):
    """``formats.quanto.quantize_affine``: bf16 group rows on a CPU in one C pass."""
    base = w if group is None else w.reshape(-1, group)
    if _in_c(base):
        return native_quantize.quanto_affine(base, bits)
    return qm.quantize_affine(w, bits, group)


def _in_c(w: torch.Tensor) -> bool:
    """csrc/quantize.c's case for quanto (``native.quantize.bf16_rows_supported``)."""
    return native_quantize.bf16_rows_supported(w)


# -- bitsandbytes -----------------------------------------------------------------------------------
def bnb_quantize_4bit(w: torch.Tensor, quant_type: str, double_quant: bool,
                      quant_storage: torch.dtype, blocksize: int = 64):
    """``bitsandbytes.functional.quantize_4bit``: (packed, QuantState). bf16 on a CPU (numel a
    multiple of the block size) in one C pass; the double quantization of the absmax (1/64 of
    the data) stays bitsandbytes' own."""
    bnb = _bnb_functional()
    if not (native_quantize.bf16_rows_supported(w) and w.numel() % blocksize == 0):
        return bnb.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                 compress_statistics=double_quant, quant_storage=quant_storage)
    bounds, order = _bnb4_tables(quant_type)
    packed, absmax = native_quantize.bnb4(w, bounds, order, blocksize)
    if quant_storage != torch.uint8:   # as bitsandbytes' own view
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    code = bnb.get_4bit_type(quant_type, device=w.device)
    if double_quant:                   # bitsandbytes' quantize_4bit, with its absmax
        offset = absmax.mean()
        qabsmax, state2 = bnb.quantize_blockwise(absmax - offset, blocksize=256)
        return packed, bnb.QuantState(absmax=qabsmax, shape=w.shape, dtype=w.dtype,
                                      blocksize=blocksize, code=code, quant_type=quant_type,
                                      offset=offset, state2=state2)
    return packed, bnb.QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype,
                                  blocksize=blocksize, code=code, quant_type=quant_type)


_TABLES: dict = {}


def _bnb4_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(15 float32 bucket bounds, 16 uint8 codes) as bitsandbytes' CPU quantize_4bit builds
    them: the midpoints of its sorted code and each bucket's code index."""
    if quant_type not in _TABLES:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
        bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        _TABLES[quant_type] = (bounds.float().contiguous(), order.to(torch.uint8).contiguous())
    return _TABLES[quant_type]


def bnb_int8_vectorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 row absmax) of ``int8_vectorwise_quant(w.to(float16))``, as
    bitsandbytes' Int8Params quantizes: bf16 rows on a CPU in one C pass."""
    if w.dim() == 2 and native_quantize.bf16_rows_supported(w):
        done = native_quantize.bnb_int8(w)
        if done is not None:
            return done
    cb, scb, _ = _bnb_functional().int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return cb, scb


def _bnb_functional():
    import bitsandbytes.functional as bnb_functional
    return bnb_functional


# -- GGUF -------------------------------------------------------------------------------------------
def gguf_quantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """``formats.gguf.quantize``: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 of bf16 on a CPU in one C
    pass; the K-quants Q4_K, Q5_K and Q6_K of bf16, float32 or float16 on a CPU in C too (their scale
    searches in ggml's order, the reference's bytes)."""
    kind = gg.ggml_type(qtype)
    if w.dim() >= 1 and int(kind) in native_quantize.KQUANT_TYPES and w.shape[-1] % 256 == 0 \
            and native_quantize.kquant_supported(w):
        blocks = native_quantize.gguf_kquant(w, int(kind))
        if blocks is not None:
            return blocks.reshape(gg.byte_shape(tuple(w.shape), kind))
    elif int(kind) in native_quantize.GGUF_TYPES and native_quantize.bf16_rows_supported(w) \
            and w.numel() % 32 == 0 and w.dim() >= 1 and w.shape[-1] % 32 == 0:
        blocks = native_quantize.gguf(w, int(kind))
        if blocks is not None:
            return blocks.reshape(gg.byte_shape(tuple(w.shape), kind))
    return gg.quantize(w, kind)
