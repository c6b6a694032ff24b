"""optimum-quanto: weight-only float8 / int8 / int4 / int2, saved in quanto's own layout.

quanto keeps weights in tensor subclasses; here they are opened at the file boundary into plain
buffers named as quanto serializes them, so diffusers' quanto checkpoints load here and back:

- int8 / float8: ``weight._data`` ([out, in] int8 or float8_e4m3fn), ``weight._scale`` ([out, 1]);
- int4 / int2: ``weight._data._data`` (uint8, quanto's bit packing of the [groups, group_size]
  codes along dim 0), ``weight._scale`` and ``weight._shift`` ([groups, 1]), w = scale*q - shift;
- always ``input_scale`` and ``output_scale`` (scalars of ones: weight-only quantization).

Quantization is quanto's (its optimizers and ``quantize_weight``, repeated op for op in
``ops/formats/quanto.py`` so that loading needs no import of optimum-quanto), so the bytes match
what diffusers writes. Forward for int8/float8 is quanto's ``qbytes_mm`` op (its CPU int8 kernel
crashes on memory that is not 16-byte aligned, so operands are realigned first); int4/int2
dequantize in plain torch and matmul, which also works under ``torch.inference_mode()`` where
quanto's own int4 CPU layer fails.

Example:
    >>> from diffquant import QuantoConfig
    >>> QuantoConfig("int4").to_dict()
    {'quant_method': 'quanto', 'weights_dtype': 'int4', 'modules_to_not_convert': None}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..ops.cpu import int4 as f4
from ..ops.cpu import int8 as ci8
from ..ops.cpu import linear as fl
from ..ops.cpu import quantize as cq
from ..ops.cpu.dispatch import ROUTES
from ..ops.formats import quanto as qm
from .auto import register_quantizer
from .base import DiffusersQuantizer, PiecesLinear, require, require_installed
from .config import QuantizationConfigMixin, QuantizationMethod

WEIGHTS_DTYPES = ("float8", "int8", "int4", "int2")
_BITS = {"float8": 8, "int8": 8, "int4": 4, "int2": 2}
_CODE_DTYPES = {"float8": torch.float8_e4m3fn, "int8": torch.int8}


def _quanto():
    return require("optimum.quanto", "quanto")


class QuantoConfig(QuantizationConfigMixin):
    """diffusers' QuantoConfig: ``weights_dtype`` one of "float8", "int8", "int4", "int2".

    Example:
        >>> from diffquant import QuantoConfig
        >>> QuantoConfig(weights_dtype="int8", modules_to_not_convert=["proj_out"]).weights_dtype
        'int8'
    """

    _method_value = ("quanto",)

    def __init__(self, weights_dtype: str = "int8", modules_to_not_convert=None):
        self.quant_method = QuantizationMethod.QUANTO
        if not isinstance(weights_dtype, str) or weights_dtype not in WEIGHTS_DTYPES:
            raise ConfigError(f"QuantoConfig.weights_dtype={weights_dtype!r}: expected one of "
                              f"{list(WEIGHTS_DTYPES)}")
        self.weights_dtype = weights_dtype
        self.modules_to_not_convert = self._check_modules_list(modules_to_not_convert)

    @property
    def bits(self) -> int:
        return _BITS[self.weights_dtype]

    @classmethod
    def transformers_kwargs(cls, quant_kwargs: dict) -> dict:
        """transformers' QuantoConfig calls ``weights_dtype`` ``weights``."""
        out = dict(quant_kwargs)
        if "weights_dtype" in out:
            out["weights"] = out.pop("weights_dtype")
        return out

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        return {w: {"weights_dtype": w} for w in WEIGHTS_DTYPES}

    @classmethod
    def cpu_examples(cls) -> list["QuantoConfig"]:
        return [cls(w) for w in WEIGHTS_DTYPES]


# -- quanto's formats as plain functions ---------------------------------------------------------
def group_size_for(weights_dtype: str, in_features: int) -> int | None:
    """The group size quanto's QLinear picks: 128, stepping down by 32 to a divisor of
    in_features; None (one group per row) for 8-bit types, small or indivisible rows."""
    if _BITS[weights_dtype] == 8 or in_features <= 128:
        return None
    size = 128
    while in_features % size != 0 and size > 32:
        size -= 32
    return size if in_features % size == 0 else None


def quantize(w: torch.Tensor, weights_dtype: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """``w`` [out, in] -> quanto's serialized pieces, as QLinear freezes (absmax scales for 8
    bits, min/max scale and shift for 4/2 bits): ``ops/formats/quanto.py``'s copy of its ops
    (the same bits, without importing optimum-quanto: ~5 s; in one C pass for bf16 rows,
    ``ops/cpu/quantize.py``), quanto itself for a single row."""
    bits = _BITS[weights_dtype]
    if not qm.supported(w, None if bits == 8 else group_size):
        return quantize_with_quanto(w, weights_dtype, group_size)
    if bits == 8:
        data, scale = cq.quantize_symmetric(w, _CODE_DTYPES[weights_dtype])
        return {"weight._data": data, "weight._scale": scale}
    packed, scale, shift = cq.quantize_affine(w, bits, group_size)
    return {"weight._data._data": packed, "weight._scale": scale, "weight._shift": shift}


def quantize_with_quanto(w: torch.Tensor, weights_dtype: str,
                         group_size: int | None) -> dict[str, torch.Tensor]:
    """``quantize`` by quanto's own optimizers and ``quantize_weight``."""
    quanto = _quanto()
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

    qtype = {"float8": quanto.qfloat8, "int8": quanto.qint8, "int4": quanto.qint4,
             "int2": quanto.qint2}[weights_dtype]
    if qtype.bits == 8:
        scale, shift = AbsmaxOptimizer()(w, qtype=qtype, axis=0), None
    else:
        scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=group_size)
    # optimized=False keeps the kernel-agnostic packing quanto serializes
    qt = quanto.quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift,
                                group_size=group_size, optimized=False)
    if qtype.bits == 8:
        return {"weight._data": qt._data, "weight._scale": qt._scale}
    return {"weight._data._data": qt._data._data, "weight._scale": qt._scale,
            "weight._shift": qt._shift}


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a fresh copy when its memory is not 16-byte aligned (quanto's CPU int8 kernel,
    torch._weight_int8pack_mm, reads it with aligned vector loads and crashes otherwise)."""
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


class QuantoLinear(PiecesLinear):
    """A quanto-quantized linear layer with plain buffers under quanto's serialized names."""

    def __init__(self, in_features, out_features, bias, compute_dtype=None, *, weights_dtype="int8"):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.weights_dtype, self.bits = weights_dtype, _BITS[weights_dtype]
        self.group_size = group_size_for(weights_dtype, in_features)
        data = "weight._data" if self.bits == 8 else "weight._data._data"
        shift = () if self.bits == 8 else ("weight._shift",)
        self._init_pieces({data: "weight_data", "weight._scale": "weight_scale",
                           **{s: "weight_shift" for s in shift},
                           "input_scale": "input_scale", "output_scale": "output_scale"})

    def required_pieces(self) -> list[str]:
        return [p for p in self.pieces if not p.endswith("put_scale")]

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        if not pre_quantized:
            if name != "weight":
                self._refuse(name)
            w = tensor if dtype is None else tensor.to(dtype)
            for piece, t in quantize(w, self.weights_dtype, self.group_size).items():
                self._put(piece, aligned(t))
            for piece in ("input_scale", "output_scale"):
                self._put(piece, torch.ones((), dtype=w.dtype, device=w.device))
            return
        if name not in self.pieces:
            self._refuse(name)
        if name.startswith("weight._data"):
            self._check_data(name, tensor)
        elif name in ("weight._scale", "weight._shift"):
            rows = self.out_features * self.in_features // (self.group_size or self.in_features)
            if tuple(tensor.shape) != (rows, 1):
                raise CheckpointError(f"QuantoLinear: {name!r} should be [{rows}, 1] for weights_"
                                      f"dtype={self.weights_dtype!r}, got {list(tensor.shape)}")
        self._put(name, aligned(tensor))

    def _check_data(self, name, t):
        if self.bits == 8:
            ok, want = t.dtype == _CODE_DTYPES[self.weights_dtype] and \
                tuple(t.shape) == (self.out_features, self.in_features), \
                f"{_CODE_DTYPES[self.weights_dtype]} {[self.out_features, self.in_features]}"
        else:
            rows = self.out_features * self.in_features // (self.group_size or self.in_features)
            n = -(-rows // (8 // self.bits)) * (self.group_size or self.in_features)
            ok, want = t.dtype == torch.uint8 and t.numel() == n, f"{n} packed uint8 values"
        if not ok:
            raise CheckpointError(f"QuantoLinear: {name!r} should be {want} for weights_dtype="
                                  f"{self.weights_dtype!r}, got {t.dtype} {list(t.shape)}; does "
                                  "config.json's quantization_config match the weights?")

    def _refuse(self, name):
        raise CheckpointError(f"QuantoLinear: unexpected tensor {name!r} for a quanto "
                              f"{self.weights_dtype} layer; expected {list(self.pieces)}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, attr in self.pieces.items():
            if name == "input_scale" and self.bias is not None:  # quanto's order: weight, bias, ...
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            t = getattr(self, attr)
            if t is not None:
                destination[prefix + name] = t if keep_vars else t.detach()

    def dequantized_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if self.bits == 8:
            return self.weight_scale * self.weight_data.to(self.weight_scale.dtype)  # [out, in]
        return qm.dequantize_bits(self.weight_data, self.weight_scale, self.weight_shift, self.bits,
                               shape)

    def _prepare(self):
        if self.bits == 8:  # weight_scale [out, 1] * weight_data, or quanto's own int8pack kernel
            return ci8.prepare_row_scaled(self.weight_data, self.weight_scale,
                                          ROUTES[f"quanto {self.weights_dtype}"])
        return f4.prepare_quanto_bits(self.weight_data, self.weight_scale, self.weight_shift,
                                      self.bits, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight_scale.dtype)  # quanto computes in its scale (= model) dtype
        if self.use_fast_path(x):  # same math in reused buffers; packed kernels for few rows
            w = self.fast_weight(self._prepare, self.weight_data, self.weight_scale,
                                 *(() if self.bits == 8 else (self.weight_shift,)))
            return fl.linear(x, w, self.bias)  # the bias added after the product, as below
        if self.bits != 8:
            out = F.linear(x, self.dequantized_weight())
        else:
            _quanto()  # registers torch.ops.quanto
            x2 = aligned(x.reshape(-1, self.in_features))
            out = torch.ops.quanto.qbytes_mm(x2, aligned(self.weight_data), self.weight_scale)
            out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias  # unfused, as quanto adds it

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weights_dtype}, group_size={self.group_size}"


@register_quantizer("quanto", QuantoConfig)
class QuantoQuantizer(DiffusersQuantizer):
    """Weight-only quantization with optimum-quanto's formats; runs on a CPU.

    Example:
        >>> import torch
        >>> from diffquant import FluxTransformer2DModel, QuantoConfig
        >>> m = FluxTransformer2DModel.from_pretrained("dir", subfolder="transformer",  # doctest: +SKIP
        ...         quantization_config=QuantoConfig("int8"), torch_dtype=torch.bfloat16)
    """

    default_torch_dtype = torch.float32

    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        require_installed("optimum.quanto", "quanto")  # imported only where it runs (~5 s)

    def make_layer(self, name, module):
        with torch.device("meta"):  # the bias is filled from the checkpoint
            return QuantoLinear(module.in_features, module.out_features, module.bias is not None,
                                weights_dtype=self.quantization_config.weights_dtype)

    def postprocess_model(self, model, **kwargs) -> None:
        for name, module in model.named_modules():
            if not isinstance(module, QuantoLinear):
                continue
            module.check_complete(name, "quanto")
            for piece in ("input_scale", "output_scale"):  # optional: ones, as quanto makes them
                if piece not in module._loaded:
                    s = module.weight_scale
                    module._put(piece, torch.ones((), dtype=s.dtype, device=s.device))

    def scheme_name(self) -> str:
        return f"quanto {self.quantization_config.weights_dtype}"
