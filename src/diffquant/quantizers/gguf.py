"""GGUF backend: GGUFQuantizationConfig, the GGUFLinear layer and GGUFQuantizer.

Like diffusers, a GGUF model keeps each linear weight as the file's raw ggml blocks and
dequantizes them to ``compute_dtype`` in every forward. diffquant goes further:

- ``quant_type="Q8_0"`` (or Q6_K, Q5_0, Q5_1, Q4_K, Q4_0, Q4_1) quantizes a full-precision
  checkpoint while loading it with ``from_pretrained`` (diffusers only loads pre-quantized
  ``.gguf`` files);
- a GGUF model saves with ``save_pretrained`` and reloads with ``from_pretrained``, no config
  needed; ``export_gguf`` writes a ``.gguf`` file that diffusers and llama.cpp tools read.

On disk (``save_pretrained``), a GGUFLinear ``x`` is two plain tensors, so the state dict goes
straight into safetensors and describes itself:

    x.weight        uint8 [out_features, in_features // block_size * type_size]  ggml blocks
    x.weight_qtype  int32 []                                                     GGML type id
    x.bias          compute_dtype [out_features]                                 (if any)

A layer's type may differ from ``quant_type`` (mixed files, or rows that are not a multiple of
the block size, which are kept in the float type of the checkpoint dtype).

Example:
    >>> import torch
    >>> from diffquant import FluxTransformer2DModel, GGUFQuantizationConfig
    >>> m = FluxTransformer2DModel.from_single_file(                               # doctest: +SKIP
    ...     "flux1-dev-Q4_K_S.gguf", quantization_config=GGUFQuantizationConfig(torch.bfloat16),
    ...     config="flux_dir/transformer", torch_dtype=torch.bfloat16)
    >>> m = FluxTransformer2DModel.from_pretrained("dir", subfolder="transformer",  # doctest: +SKIP
    ...     quantization_config=GGUFQuantizationConfig(torch.bfloat16, quant_type="Q8_0"))
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, QuantizationError
from ..ops.cpu.gguf import prepare_gguf_weight
from ..ops.cpu.linear import linear
from ..ops.formats.gguf import (FLOAT_TYPES, QUANTIZABLE_TYPES, BLOCK_LAYOUT, GGMLType, dequantize,
                                ggml_type, logical_shape, quantizable_type, quantize)
from ..ops.cpu.quantize import gguf_quantize
from .auto import register_quantizer
from .base import DiffusersQuantizer, QuantizedLinear, owner_of
from .config import QuantizationConfigMixin, QuantizationMethod, str_to_dtype

logger = logging.getLogger(__name__)

_FLOAT_GGML = {dtype: qtype for qtype, dtype in FLOAT_TYPES.items()}


class GGUFQuantizationConfig(QuantizationConfigMixin):
    """Config of the GGUF backend.

    Args:
        compute_dtype: dtype the weights are dequantized to in forward (diffusers' default:
            torch.float32).
        quant_type: None (default, as diffusers): only load pre-quantized GGUF weights; or a
            GGUF type name ("Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "BF16", "F16",
            "F32") to quantize a full-precision checkpoint while loading it (K types need rows
            that are a multiple of 256; other layers stay in the checkpoint's float type).
        modules_to_not_convert: module names or globs kept in full precision.

    Example:
        >>> import torch
        >>> c = GGUFQuantizationConfig(torch.bfloat16, quant_type="Q8_0")
        >>> GGUFQuantizationConfig.from_dict(c.to_dict()) == c
        True
    """

    _method_value = ("gguf",)
    _derived_keys = ("quant_method", "pre_quantized")  # diffusers writes pre_quantized=True

    def __init__(self, compute_dtype: torch.dtype | str | None = None, quant_type: str | None = None,
                 modules_to_not_convert: list[str] | None = None):
        self.quant_method = QuantizationMethod.GGUF
        dtype = str_to_dtype(compute_dtype, "compute_dtype", type(self).__name__) or torch.float32
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise ConfigError(f"GGUFQuantizationConfig.compute_dtype={dtype}: expected a float dtype "
                              "such as torch.bfloat16, torch.float16 or torch.float32")
        self.compute_dtype = dtype
        if quant_type is not None:
            qtype = quantizable_type(quant_type)
            if qtype is None:
                raise ConfigError(f"GGUFQuantizationConfig.quant_type={quant_type!r}: expected None (load "
                                  "pre-quantized files only) or one of "
                                  f"{[t.name for t in QUANTIZABLE_TYPES]}")
            quant_type = qtype.name
        self.quant_type = quant_type
        self.modules_to_not_convert = self._check_modules_list(modules_to_not_convert)

    @property
    def bits(self) -> int:
        """Weight width hint: 8 for Q8_0, 6 for Q6_K, 5 for Q5_*, 4 for Q4_*, 16/32 for floats."""
        if self.quant_type is None:
            return 0  # pre-quantized: each tensor of the file has its own type
        return {"Q8": 8, "Q6": 6, "Q5": 5, "Q4": 4, "F1": 16, "BF": 16, "F3": 32}[self.quant_type[:2]]

    in_transformers = False  # transformers' GGUF config reads .gguf files; it does not quantize

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        return {t.name.lower(): {"quant_type": t.name} for t in QUANTIZABLE_TYPES}

    @classmethod
    def cpu_examples(cls) -> list["GGUFQuantizationConfig"]:
        return [cls(torch.bfloat16, quant_type="Q8_0"), cls(torch.float32, quant_type="Q4_0"),
                cls(torch.bfloat16, quant_type="Q5_1")]


class GGUFLinear(QuantizedLinear):
    """nn.Linear whose weight is raw ggml blocks, dequantized to ``compute_dtype`` in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype=None,
                 quant_type: str | None = None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.quant_type = quant_type  # what a full-precision weight is quantized to while loading
        self.qtype: GGMLType | None = None  # the type of the blocks held now (a Python int: no sync)
        self.register_buffer("weight", torch.empty(out_features, 0, dtype=torch.uint8))
        self.register_buffer("weight_qtype", torch.empty((), dtype=torch.int32))

    def load_piece(self, name: str, tensor: torch.Tensor, *, pre_quantized: bool, dtype, device):
        if name == "weight_qtype":
            self.qtype = ggml_type(int(tensor))
            self.weight_qtype = tensor.to(torch.int32)
        elif name == "weight" and tensor.dtype == torch.uint8:
            self.weight = tensor  # raw blocks; their type arrives as weight_qtype
        elif name == "weight" and tensor.is_floating_point():
            self._store_float(tensor, dtype or tensor.dtype, pre_quantized)
        else:
            raise CheckpointError(f"unexpected GGUF layer tensor {name!r} of dtype {tensor.dtype}; "
                                  "expected 'weight' (uint8 blocks or floats) and 'weight_qtype'")

    def _store_float(self, weight: torch.Tensor, dtype: torch.dtype, pre_quantized: bool) -> None:
        qtype = _FLOAT_GGML.get(dtype, GGMLType.F32)
        if self.quant_type is not None and not pre_quantized:
            wanted = ggml_type(self.quant_type)
            if weight.shape[-1] % BLOCK_LAYOUT[wanted][0] == 0:
                qtype = wanted
            else:
                logger.info("GGUF: rows of %d values are not a multiple of the %s block size; "
                            "this layer is kept in %s", weight.shape[-1], wanted.name, qtype.name)
        self.weight = gguf_quantize(weight, qtype)  # formats.gguf.quantize, bf16 in C
        self.qtype = qtype
        self.weight_qtype = torch.tensor(int(qtype), dtype=torch.int32, device=weight.device)

    def check_loaded(self, name: str) -> None:
        """Raise if the blocks and their type do not decode to [out_features, in_features]."""
        if self.qtype is None or self.weight.is_meta:
            raise CheckpointError(f"GGUF layer {name!r}: missing 'weight' or 'weight_qtype'")
        try:
            shape = logical_shape(tuple(self.weight.shape), self.qtype)
        except QuantizationError as err:
            raise CheckpointError(f"GGUF layer {name!r}: {err}") from None
        if shape != (self.out_features, self.in_features):
            raise CheckpointError(f"GGUF layer {name!r}: {self.qtype.name} blocks of shape "
                                  f"{list(self.weight.shape)} decode to {list(shape)}, but the layer is "
                                  f"[{self.out_features}, {self.in_features}]")

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, self.compute_dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        if self.use_fast_path(x):  # dequantize into a reused buffer; int4 kernel for few rows
            w = self.fast_weight(lambda: prepare_gguf_weight(self.weight, self.qtype, lazy=True),
                                 self.weight, self.weight_qtype)
            return linear(x.to(dtype), w, bias).to(x.dtype)
        weight = self.dequantized_weight()                                # [out, in]
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        kind = self.qtype.name if self.qtype is not None else self.quant_type
        return f"{super().extra_repr()}, qtype={kind}, compute_dtype={self.compute_dtype}"


class GGUFEmbedding(nn.Module):
    """nn.Embedding whose table is raw ggml blocks: a lookup decodes only the rows it picks
    (a ggml block never crosses a row), so a quantized vocabulary stays quantized in memory.

    Example:
        >>> import torch
        >>> from diffquant.ops.formats.gguf import quantize
        >>> emb = GGUFEmbedding(4, 64, compute_dtype=torch.float32)
        >>> emb.load_blocks(quantize(torch.randn(4, 64), "Q8_0"), "Q8_0")
        >>> emb(torch.tensor([[0, 3]])).shape
        torch.Size([1, 2, 64])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, compute_dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype = compute_dtype
        self.qtype: GGMLType | None = None
        self.register_buffer("weight", torch.empty(num_embeddings, 0, dtype=torch.uint8))

    def load_blocks(self, blocks: torch.Tensor, qtype) -> None:
        qtype = ggml_type(qtype)
        shape = logical_shape(tuple(blocks.shape), qtype)
        if shape != (self.num_embeddings, self.embedding_dim):
            raise CheckpointError(f"GGUF embedding: {qtype.name} blocks decode to {list(shape)}, "
                                  f"expected [{self.num_embeddings}, {self.embedding_dim}]")
        self.weight, self.qtype = blocks, qtype

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, self.compute_dtype or torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]                               # (..., bytes per row) uint8
        return dequantize(rows, self.qtype, self.compute_dtype or torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={getattr(self.qtype, 'name', None)}"


@register_quantizer("gguf", GGUFQuantizationConfig)
class GGUFQuantizer(DiffusersQuantizer):
    """Swaps nn.Linear for GGUFLinear; loads ggml blocks, or quantizes floats to ``quant_type``."""

    def __init__(self, quantization_config, pre_quantized: bool = True, **kwargs):
        super().__init__(quantization_config, pre_quantized=pre_quantized, **kwargs)
        self.compute_dtype = quantization_config.compute_dtype

    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        if not self.pre_quantized and self.quantization_config.quant_type is None:
            raise QuantizationError(
                "GGUFQuantizationConfig(quant_type=None) only loads pre-quantized GGUF weights "
                "(from_single_file('model.gguf') or a directory saved by diffquant); to quantize "
                "this full-precision checkpoint while loading, pass quant_type= one of "
                f"{[t.name for t in QUANTIZABLE_TYPES]}")

    def update_torch_dtype(self, torch_dtype):
        return torch_dtype if torch_dtype is not None else self.compute_dtype

    def make_layer(self, name: str, module: nn.Module) -> GGUFLinear:
        quant_type = None if self.pre_quantized else self.quantization_config.quant_type
        with torch.device("meta"):
            return GGUFLinear(module.in_features, module.out_features, module.bias is not None,
                              compute_dtype=self.compute_dtype, quant_type=quant_type)

    def check_if_quantized_param(self, model: nn.Module, key: str, checkpoint=None) -> bool:
        module, rel = owner_of(model, key)
        return isinstance(module, GGUFLinear) and rel in ("weight", "weight_qtype")

    def create_quantized_param(self, model, key, tensor, dtype, device) -> None:
        try:
            super().create_quantized_param(model, key, tensor, dtype, device)
        except (QuantizationError, CheckpointError) as err:
            raise CheckpointError(f"tensor {key!r}: {err}") from None

    def postprocess_model(self, model: nn.Module, **kwargs) -> None:
        for name, module in model.named_modules():
            if isinstance(module, GGUFLinear):
                module.check_loaded(name)

    def dequantize(self, model: nn.Module) -> nn.Module:
        # Restore the dtype the model was loaded in (its norms and biases have it), not
        # compute_dtype as diffusers does: with float32 compute and a bf16 model, diffusers'
        # dequantized model mixes dtypes and its forward fails.
        dtype = getattr(model, "config", {}).get("_pre_quantization_dtype")
        for module in model.modules():
            if isinstance(module, GGUFLinear) and isinstance(dtype, torch.dtype):
                module.compute_dtype = dtype
        return super().dequantize(model)

    def scheme_name(self) -> str:
        kind = self.quantization_config.quant_type or "pre-quantized"
        return f"gguf {kind} (compute {str(self.compute_dtype).split('.')[-1]})"

    @property
    def is_serializable(self) -> bool:
        return True


__all__ = ["GGUFEmbedding", "GGUFLinear", "GGUFQuantizationConfig", "GGUFQuantizer"]
