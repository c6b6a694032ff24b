"""The torchao backend's layers (``torchao.py`` holds its config and quantizer): plain buffers
(``weight`` int8 / packed uint4 / float8, ``weight_scale``, ``weight_zero``) that reproduce
torchao's numerics with ``diffquant.ops.formats.torchao``, and take the fast CPU paths of
``diffquant.ops`` where those give the same numbers."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..ops.cpu import int8 as ci8
from ..ops.cpu import int4 as f4
from ..ops.cpu import int8_dynamic as fi
from ..ops.cpu import linear as fl
from ..ops.cpu import quantize as cq
from ..ops.cpu.dispatch import ROUTES
from ..ops.formats import torchao as iq
from .base import QuantizedLinear


class TorchAoLinear(QuantizedLinear):
    """Base of the torchao layers: ``pieces()`` names the buffers, ``quantize`` fills them."""

    def __init__(self, in_features, out_features, bias, compute_dtype=None, **params):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.params = params
        for name, (shape, dtype) in self.pieces().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def pieces(self) -> dict[str, tuple[tuple, torch.dtype]]:
        return {"weight": ((self.out_features, self.in_features), torch.int8),
                "weight_scale": ((self.out_features, 1), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = cq.int8_quantize_per_channel(w)
        return {"weight": q, "weight_scale": scale}

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        expected = self.pieces()
        if name == "weight" and not pre_quantized:
            w = tensor.to(dtype) if dtype is not None else tensor
            self.compute_dtype = w.dtype
            for key, value in self.quantize(w).items():
                self._buffers[key] = value
            return
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} for a {type(self).__name__}; "
                                  f"expected {sorted(expected)}")
        shape, want = expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != want:
            raise CheckpointError(f"tensor {name!r} of a {type(self).__name__} is {tensor.dtype} "
                                  f"{list(tensor.shape)}, expected {want} {list(shape)}; the "
                                  "checkpoint does not match its quantization_config")
        self.compute_dtype = self.compute_dtype or dtype
        self._buffers[name] = tensor

    def dequantized_weight(self):
        return iq.int8_dequantize(self.weight, self.weight_scale, self.compute_dtype or torch.bfloat16)

    def forward(self, x):
        if self.use_fast_path(x):  # same numbers (bf16 rounding for few rows), less time
            w = self.fast_weight(lambda: ci8.prepare_int8_weight(self.weight, self.weight_scale),
                                 self.weight, self.weight_scale)
            return fl.linear(x, w, self.bias)
        return iq.int8_weight_only_linear(x, self.weight, self.weight_scale, self.bias)


class Int8WeightOnlyLinear(TorchAoLinear):
    """int8 per-channel weights, activations stay in their dtype (torchao Int8WeightOnlyConfig)."""


class Int8DynamicLinear(TorchAoLinear):
    """int8 per-token activations x int8 per-channel weights, integer matmul (torch._int_mm)."""

    def forward(self, x):
        if self.use_fast_path(x):  # bit-identical to the reference
            w = self.fast_weight(lambda: fi.prepare_int8_dynamic(self.weight, self.weight_scale),
                                 self.weight, self.weight_scale)
            return fi.linear_int8_dynamic(x, w, self.bias)
        return iq.int8_dynamic_linear(x, self.weight, self.weight_scale, self.bias)


class Int4WeightOnlyLinear(TorchAoLinear):
    """uint4 pairs packed in uint8, one (scale, zero) per group of columns; dequantize, matmul."""

    def pieces(self):
        n, k, g = self.out_features, self.in_features, self.params["group_size"]
        dtype = self.compute_dtype or torch.bfloat16
        return {"weight": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // g), dtype),
                "weight_zero": ((n, k // g), dtype)}

    def quantize(self, w):
        packed, scale, zero = cq.int4_quantize_groupwise(w, self.params["group_size"])
        return {"weight": packed, "weight_scale": scale, "weight_zero": zero}

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        if pre_quantized and name != "weight" and tensor.is_floating_point():
            self.compute_dtype = tensor.dtype  # stored scales carry the dtype; keep them exact
        super().load_piece(name, tensor, pre_quantized=pre_quantized, dtype=dtype, device=device)

    def dequantized_weight(self):
        return iq.int4_dequantize(self.weight, self.weight_scale, self.weight_zero,
                                  self.weight_scale.dtype)

    def forward(self, x):
        if self.use_fast_path(x):  # packed int4 kernel for few rows (built on first such call)
            w = self.fast_weight(lambda: f4.prepare_int4_weight(
                self.weight, self.weight_scale, self.weight_zero, lazy=True),
                self.weight, self.weight_scale, self.weight_zero)
            return fl.linear(x, w, self.bias)  # the bias added after the product, as below
        y = torch.matmul(x, self.dequantized_weight().to(x.dtype).t())
        return y + self.bias if self.bias is not None else y


class Float8WeightOnlyLinear(TorchAoLinear):
    """float8 per-channel weights, dequantized to the activations' dtype for the matmul."""

    def pieces(self):
        return {"weight": ((self.out_features, self.in_features), self.params["weight_dtype"]),
                "weight_scale": ((self.out_features, 1), torch.float32)}

    def quantize(self, w):
        q, scale = iq.float8_quantize_per_channel(w, self.params["weight_dtype"])
        return {"weight": q, "weight_scale": scale}

    def dequantized_weight(self):
        return iq.float8_dequantize(self.weight, self.weight_scale, self.compute_dtype or torch.bfloat16)

    def forward(self, x):
        if self.use_fast_path(x):  # the float32 dequantization, into a reused buffer
            w = self.fast_weight(lambda: ci8.prepare_row_scaled(
                self.weight, self.weight_scale, ROUTES["torchao float8wo"]),
                self.weight, self.weight_scale)
            return fl.linear(x, w, self.bias)  # the bias added after the product
        return iq.float8_weight_only_linear(x, self.weight, self.weight_scale, self.bias)


LAYERS = {"int8wo": Int8WeightOnlyLinear, "int8dq": Int8DynamicLinear, "int4wo": Int4WeightOnlyLinear,
          "float8wo": Float8WeightOnlyLinear}
