"""NVIDIA ModelOpt's compressed weight formats, as plain functions over tensors.

Which attributes modelopt's ``quant_cfg`` gives a layer's weight quantizer (``resolve_quantizer``,
as modelopt applies its patterns), which format those select (``scheme_of``, as ``mtq.compress``
picks its QTensor class), compressing a weight with modelopt's TensorQuantizer (``compress``) and
dequantizing it in plain torch (``dequantize`` and one function per format).

ModelOpt's ``mtq.compress`` stores a linear layer's weight as packed data plus buffers on its
``weight_quantizer`` (``_amax``, ``_scale``, and for the double-scaled formats ``_double_scale``
and ``_scale_zeros``). These functions turn those tensors back into a dense weight with the same
arithmetic (same dtypes, same order of operations) as modelopt's own ``*QTensor.dequantize``, so
a compressed checkpoint runs on any device without modelopt's kernels.

Layouts (weight of logical shape (out, in)):
    FP8   q: float8_e4m3fn (out, in)  scale: () | (out, 1) | (out, in/b)     w = q * scale
    INT8  q: int8 (out, in)           scale: as FP8                          w = q * scale
    INT4  q: uint8 (out, in/2)        scale: (n_blocks, 1) = 7 / block_amax  w = (nibble - 8) / scale
          high nibble first: byte = w0 << 4 | w1
    NF4   q: uint8 (out*in/2,)        scale: int8 (n_blocks/sb...), double_scale, scale_zeros
          block_scale = scale / double_scale + scale_zeros;  w = NF4_TABLE[nibble] * block_scale
    NVFP4 q: uint8 (out, in/2)        scale: float8_e4m3fn (out, in/b), double_scale: float32 ()
          low nibble first: byte = w1 << 4 | w0;  w = E2M1[nibble] * scale * double_scale

Example:
    >>> import torch
    >>> q = torch.tensor([[2, -4]], dtype=torch.int8)
    >>> dequantize_scaled(q, torch.tensor(0.5), None, (1, 2), torch.float32)
    tensor([[ 1., -2.]])
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from ...errors import QuantizationError

CPU_SCHEMES = ("FP8", "INT8", "INT4", "NF4", "NVFP4")
# Buffers each compressed format keeps on its weight_quantizer (besides the optional _amax).
SCHEME_PIECES = {"FP8": ("_scale",), "INT8": ("_scale",), "INT4": ("_scale",),
                 "NF4": ("_scale", "_double_scale", "_scale_zeros"),
                 "NVFP4": ("_scale", "_double_scale")}
# The block sizes ModelOpt's usual configs give each block format, which NVIDIAModelOptConfig (as
# diffusers') leaves to the caller: INT8 per output channel, as ModelOpt's INT8 default (the
# config alone gives one scale per tensor); INT4 in blocks of 128 as its
# INT4_BLOCKWISE_WEIGHT_ONLY_CFG; NF4 in blocks of 64 with its scales quantized in blocks of 256,
# bitsandbytes' sizes; NVFP4 in its blocks of 16 (the scale block does not change its weights:
# their second scale is per tensor).
USUAL_BLOCKS = {
    "INT8": {"channel_quantize": 0},
    "INT4": {"channel_quantize": -1, "block_quantize": 128},
    "NF4": {"channel_quantize": -1, "block_quantize": 64, "scale_channel_quantize": -1,
            "scale_block_quantize": 256},
    "NVFP4": {"channel_quantize": -1, "block_quantize": 16, "scale_channel_quantize": -1,
              "scale_block_quantize": 16},
}
# modelopt's NF4 code book (bfloat16, as in modelopt.torch.quantization.qtensor.nf4_tensor).
NF4_TABLE = torch.tensor([-1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
                          0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000],
                         dtype=torch.bfloat16)
# FP4 E2M1 values by nibble: bit 3 is the sign.
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _crop(t: torch.Tensor, shape) -> torch.Tensor:
    """Drop the padding modelopt adds when a dimension is not a multiple of the block size."""
    return t.reshape(-1)[: math.prod(shape)].reshape(shape)


def dequantize_scaled(q: torch.Tensor, scale: torch.Tensor, block_sizes: dict | None, shape,
                      dtype: torch.dtype) -> torch.Tensor:
    """FP8 (e4m3) or INT8 data times a per-tensor, per-channel or per-block scale."""
    if block_sizes:
        # scale: one value per block -> repeat over each blocked dim, then crop the padding
        for dim, size in block_sizes.items():
            scale = scale.repeat_interleave(size, dim=dim)
        scale = scale[tuple(slice(0, n) for n in q.shape)]
    return (q.to(dtype) * scale.to(device=q.device, dtype=dtype))[tuple(slice(0, n) for n in shape)]


def _unpack_nibbles(q: torch.Tensor, high_first: bool) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) int64 nibbles in element order."""
    hi, lo = (q >> 4).to(torch.int64), (q & 0x0F).to(torch.int64)
    pair = (hi, lo) if high_first else (lo, hi)
    return torch.stack(pair, dim=-1).flatten(-2)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, block_size: int, shape,
                    dtype: torch.dtype) -> torch.Tensor:
    """modelopt INT4 (AWQ-style, symmetric): ``scale`` holds 7 / amax of each block."""
    values = _unpack_nibbles(q.reshape(-1), high_first=True) - 8       # (n,) in [-8, 7]
    blocks = values.view(-1, block_size) / scale.reshape(-1, 1)        # (n_blocks, block)
    return _crop(blocks, shape).to(dtype)


def nf4_block_scales(scale: torch.Tensor, double_scale: torch.Tensor, scale_zeros: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Undo NF4 double quantization: int8 scales per scale block -> one float scale per block."""
    # scale: (n_scale_blocks, scale_block) int8; double_scale: (n_scale_blocks,)
    per_row = scale.reshape(double_scale.numel(), -1) / double_scale.reshape(-1, 1)
    return (per_row.to(dtype) + scale_zeros.to(dtype)).reshape(-1)


def dequantize_nf4(q: torch.Tensor, scale: torch.Tensor, double_scale: torch.Tensor,
                   scale_zeros: torch.Tensor, block_size: int, shape,
                   dtype: torch.dtype) -> torch.Tensor:
    """modelopt NF4: code book value times its block's (double-quantized) absmax.

    modelopt 0.47's own CPU path divides a flattened (n,) scale by a (rows, 1) double scale and
    broadcasts to (rows, n); here each scale block is divided by its own double scale.
    """
    idx = _unpack_nibbles(q.reshape(-1), high_first=True)              # (n,)
    n_blocks = idx.numel() // block_size
    block_scale = nf4_block_scales(scale, double_scale, scale_zeros, dtype)[:n_blocks]
    values = NF4_TABLE.to(q.device)[idx].view(n_blocks, block_size)    # (n_blocks, block)
    return _crop(values * block_scale.view(-1, 1), shape).to(dtype)


def dequantize_nvfp4(q: torch.Tensor, scale: torch.Tensor, double_scale: torch.Tensor,
                     block_size: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """NVFP4: E2M1 values times an FP8 per-block scale times a float32 per-tensor scale."""
    idx = _unpack_nibbles(q, high_first=False)                         # (out, in)
    values = E2M1_VALUES.to(q.device)[idx]                             # float32
    block_scale = scale.to(torch.float32) * double_scale.to(q.device)  # (out, in / block)
    blocks = values.view(*values.shape[:-1], -1, block_size) * block_scale.unsqueeze(-1)
    return blocks.reshape(shape).to(dtype)


def packed_weight_mismatch(scheme: str, q: torch.Tensor, out: int, in_: int) -> str | None:
    """What a stored weight of an (out, in) layer should be, if ``q`` is not: [out, in] for
    FP8/INT8, uint8 holding every value's 4-bit code for the others (rows first, or flat)."""
    if scheme in ("FP8", "INT8"):
        return None if tuple(q.shape) == (out, in_) else f"[{out}, {in_}]"
    nbytes = -(-out * in_ // 2)
    ok = q.dtype == torch.uint8 and q.numel() >= nbytes and (q.dim() == 1 or q.shape[0] == out)
    return None if ok else f"uint8 holding {nbytes} bytes of packed 4-bit codes"


def scheme_of(attrs: dict, where: str) -> str:
    """FP8 | INT8 | INT4 | NF4 | NVFP4 from a weight quantizer's attributes (as mtq.compress)."""
    bits, blocks = attrs.get("num_bits", 8), attrs.get("block_sizes") or {}
    if blocks.get("type") == "dynamic" and blocks.get("scale_bits") == [8, 0]:
        scheme = None  # MXFP4/MXFP8
    elif bits == [4, 3]:
        scheme = "FP8"
    elif bits == 8:
        scheme = "INT8"
    elif bits == 4 and blocks.get("scale_bits") == 8 and blocks.get("scale_block_sizes"):
        scheme = "NF4"
    elif bits == [2, 1] and blocks.get("scale_bits") == [4, 3]:
        scheme = "NVFP4"
    elif bits == 4 and blocks:
        scheme = "INT4"
    else:
        scheme = None
    if scheme is None:
        raise QuantizationError(
            f"{where}: weight quantizer {attrs} has no compressed format diffquant can store. "
            f"Supported (on every device, CPU included): {', '.join(CPU_SCHEMES)}; INT4 needs "
            "block_quantize, NF4 and NVFP4 also scale_block_quantize")
    if scheme in ("INT4", "NF4", "NVFP4") and any(int(k) not in (-1, 1) for k in blocks
                                                  if not isinstance(k, str)):
        raise QuantizationError(f"{where}: {scheme} blocks must run along the last axis "
                                f"(channel_quantize=-1), got block_sizes={blocks}")
    return scheme


def compress(weight: torch.Tensor, attrs: dict) -> tuple[torch.Tensor, dict]:
    """(packed weight, weight_quantizer buffers) exactly as ``mtq.quantize`` + ``mtq.compress``.

    Runs modelopt's TensorQuantizer on this one tensor: max calibration, then real quantization.
    Needs the modelopt package (``quantizers/modelopt.py`` checks for it with a clear error).
    """
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    cfg = dict(attrs, fake_quant=False)
    for key in ("num_bits",):
        cfg[key] = tuple(cfg[key]) if isinstance(cfg.get(key), list) else cfg.get(key, 8)
    blocks = cfg.get("block_sizes")
    if blocks and isinstance(blocks.get("scale_bits"), list):
        cfg["block_sizes"] = dict(blocks, scale_bits=tuple(blocks["scale_bits"]))
    tq = TensorQuantizer(QuantizerAttributeConfig(**cfg)).to(weight.device)
    with torch.no_grad():
        tq.disable_quant()
        tq.enable_calib()
        tq(weight)                      # max calibrator sees the weight -> _amax
        tq.load_calib_amax()
        tq.enable_quant()
        tq.disable_calib()
        packed = tq(weight)             # a modelopt QTensor; scales land in tq's buffers
    return packed._quantized_data, {name: buf for name, buf in tq.named_buffers()}


def dequantize(scheme: str, q: torch.Tensor, buffers, block_sizes: dict | None, shape,
               dtype: torch.dtype) -> torch.Tensor:
    """The dense ``shape`` weight of any format; ``buffers`` has the weight_quantizer's pieces
    (``_scale``, ``_double_scale``, ``_scale_zeros``) as attributes."""
    blocks = block_sizes or {}
    if scheme in ("FP8", "INT8"):
        int_blocks = {k: v for k, v in blocks.items() if isinstance(k, int)}
        return dequantize_scaled(q, buffers._scale, int_blocks or None, shape, dtype)
    block = blocks[-1 if -1 in blocks else 1]
    if scheme == "INT4":
        return dequantize_int4(q, buffers._scale, block, shape, dtype)
    if scheme == "NF4":
        return dequantize_nf4(q, buffers._scale, buffers._double_scale, buffers._scale_zeros,
                              block, shape, dtype)
    return dequantize_nvfp4(q, buffers._scale, buffers._double_scale, block, shape, dtype)


# -- modelopt's quant_cfg: which attributes each weight quantizer gets ----------------------------
def canonical(value, key=None):
    """Tuples -> lists, and block-size keys back to ints ("-1" -> -1), so JSON round-trips."""
    if isinstance(value, dict):
        blocks = key in ("block_sizes", "scale_block_sizes")
        return {(int(k) if blocks and isinstance(k, str) and k.lstrip("-").isdigit() else k):
                canonical(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def cfg_entries(quant_cfg) -> list[tuple[str, str | None, bool | None, dict | None]]:
    """quant_cfg (flat dict or list of entries) -> [(pattern, parent_class, enable, attrs)]."""
    raw = [{k: v} for k, v in quant_cfg.items()] if isinstance(quant_cfg, dict) else list(quant_cfg)
    out = []
    for item in raw:
        item = dict(item)
        if "quantizer_name" in item:
            out.append((item["quantizer_name"], item.get("parent_class"), item.get("enable"),
                        item.get("cfg")))
            continue
        for key, body in item.items():
            key = "*" if key == "default" else key
            if key.startswith("nn."):
                out += [(k, key, v.get("enable"), {a: b for a, b in v.items() if a != "enable"} or None)
                        for k, v in body.items()]
            elif isinstance(body, dict):
                out.append((key, None, body.get("enable"),
                            {a: b for a, b in body.items() if a != "enable"} or None))
    return out


def resolve_quantizer(quant_cfg, quantizer_name: str, module: nn.Module) -> dict | None:
    """The attributes modelopt gives quantizer ``quantizer_name`` ("blocks.0.ff.weight_quantizer"),
    or None when it is disabled.

    A list (modelopt >= 0.4x) is applied as modelopt 0.47 does: in order, an entry's ``cfg``
    replaces all attributes and enables. A flat dict (what diffusers writes) is applied with the
    older modelopt semantics: a ``cfg`` only updates the attributes it names, and only ``enable``
    toggles. That makes the result independent of key order, which matters because config.json is
    written with sorted keys ("*proj_out.*" then sorts before "*weight_quantizer").
    """
    enabled, attrs = True, {"num_bits": 8, "axis": None}  # modelopt's TensorQuantizer defaults
    flat = isinstance(quant_cfg, dict)
    for pattern, parent, enable, cfg in cfg_entries(quant_cfg):
        if not fnmatch.fnmatch(quantizer_name, pattern):
            continue
        if parent is not None and type(module).__name__ != parent.removeprefix("nn."):
            continue
        if cfg is not None and not isinstance(cfg, dict):
            raise QuantizationError(f"modelopt_config quant_cfg[{pattern!r}]: sequential "
                                    "(list) quantizers are not supported by diffquant")
        if cfg is not None:
            attrs = {**attrs, **cfg} if flat else {"num_bits": 8, "axis": None, **cfg}
        if enable is not None:
            enabled = bool(enable)
        elif cfg is not None and not flat:
            enabled = True
    return canonical(attrs) if enabled else None
