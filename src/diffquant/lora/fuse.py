"""fuse_lora / unfuse_lora on one layer: merge adapters into the weight, and undo it exactly.

An ``nn.Linear`` gets ``W + delta`` as a new parameter; a quantized layer is dequantized, the
delta added in float32, and the sum quantized again to the same format through the backend's own
``load_piece(name, weight, pre_quantized=False)`` (what diffusers does for bitsandbytes). Either
way the layer's original stored tensors are kept until ``unfuse_lora`` puts them back, so the
base model's outputs come back bit for bit (PEFT subtracts the delta again, which rounds), and
until ``unload_lora_weights``, which keeps the fused weights and frees the originals.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QuantizationError
from ..quantizers.base import QuantizedLinear


def snapshot(layer: nn.Module) -> list[tuple[nn.Module, dict]]:
    """The state of ``layer`` and its submodules (tensors by reference, containers copied),
    without hooks; ``restore`` puts it back. Backends' ``load_piece`` assign new tensors, so
    the referenced ones stay as they were."""
    saved = []
    for module in layer.modules():
        state = {}
        for key, value in vars(module).items():
            if "hook" in key or key == "_modules":
                continue
            state[key] = type(value)(value) if isinstance(value, (dict, set, list)) else value
        saved.append((module, state))
    return saved


def restore(saved: list[tuple[nn.Module, dict]]) -> None:
    for module, state in saved:
        for key in [k for k in vars(module) if "hook" not in k and k != "_modules"]:
            if key not in state:
                delattr(module, key)
        vars(module).update(state)


def fuse_into(layer: nn.Module, delta: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Add ``delta`` [out, in] (float32) to ``layer``'s weight, in its own format."""
    if isinstance(layer, QuantizedLinear):
        weight = layer.dequantized_weight().float()                     # [out, in]
        weight = weight + delta.to(weight.device)
        _requantize(layer, weight, layer.compute_dtype or dtype or torch.float32)
        return
    w = layer.weight
    layer.weight = nn.Parameter((w.float() + delta.to(w.device)).to(w.dtype), requires_grad=False)


def _requantize(layer: QuantizedLinear, weight: torch.Tensor, dtype: torch.dtype) -> None:
    # GGUF layers quantize a float weight to their config's quant_type, which is None for a
    # model loaded from a .gguf file: the type of the blocks held now is the one to keep.
    qtype = getattr(layer, "qtype", None)
    keep = getattr(layer, "quant_type", None)
    if qtype is not None and hasattr(layer, "quant_type"):
        layer.quant_type = qtype.name
    try:
        layer.load_piece("weight", weight.to(dtype), pre_quantized=False, dtype=dtype,
                         device=weight.device)
    except (QuantizationError, NotImplementedError) as err:
        raise QuantizationError(f"fuse_lora: {type(layer).__name__} cannot quantize a weight "
                                f"again ({err}); keep this adapter unfused") from None
    finally:
        if qtype is not None and hasattr(layer, "quant_type"):
            layer.quant_type = keep
