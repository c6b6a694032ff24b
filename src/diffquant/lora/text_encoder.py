"""CLIP text encoder adapters through PEFT (transformers' models: PEFT's own layers fit there).

The CLIP encoder is transformers' ``CLIPTextModel`` with ``nn.Linear`` projections, which is
what PEFT's ``inject_adapter_in_model`` wraps (diffusers loads text-encoder LoRAs the same
way). Fusing is done here rather than by PEFT's ``merge``/``unmerge``, which subtracts the
update again and so does not give the original weights back exactly: the fused weight is a new
tensor and the original one is kept until ``unfuse``.

Example:
    >>> add_adapter(pipe.text_encoder, {"text_model.encoder.layers.0.self_attn.q_proj": w},  # doctest: +SKIP
    ...             "style", "lora.safetensors")
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from collections import Counter

import torch
from torch import nn

from ..errors import ConfigError
from ..quantizers.base import require
from .formats import LoraWeight


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def resolve(model: nn.Module | None, weights: dict[str, LoraWeight],
            where: str = "LoRA") -> dict[str, LoraWeight]:
    """``weights`` under ``model``'s own module names, or {} unless every target is an
    ``nn.Linear`` of it (an unquantized CLIP encoder; the caller warns that the keys were
    ignored). A target ``model`` does not have at all is an error naming the file, key and
    layer. Files name CLIP's layers ``text_model.encoder...``; transformers 5's
    ``CLIPTextModel`` has no ``text_model`` level any more."""
    if model is None:
        return {}
    modules = dict(model.named_modules())
    out, linear = {}, True
    for name, w in weights.items():
        if name not in modules and name.startswith("text_model."):
            name = name[len("text_model."):]
        if name not in modules:
            raise ConfigError(f"{where}: LoRA key {w.source!r} targets layer {name!r}, but "
                              f"{type(model).__name__} has no such layer; is this LoRA for "
                              "another model?")
        linear = linear and isinstance(_base(modules[name]), nn.Linear)
        out[name] = w
    return out if linear else {}


def _base(module):
    """A PEFT wrapper's base layer (an adapter loaded before), else the module itself."""
    return module.get_base_layer() if _is_tuner(module) else module


def add_adapter(model: nn.Module, weights: dict[str, LoraWeight], adapter_name: str,
                where: str) -> None:
    """Inject ``weights`` as PEFT LoRA layers named ``adapter_name``; it alone is active after."""
    require("peft", "lora")
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if adapter_name in list_adapters(model):
        raise ConfigError(f"adapter name {adapter_name!r} is already in use in "
                          f"{type(model).__name__}; pick another adapter_name")
    modules = dict(model.named_modules())
    for name, w in weights.items():
        layer = _base(modules[name])
        if w.up.shape != (layer.out_features, w.rank) or w.down.shape != (w.rank, layer.in_features):
            raise ConfigError(f"{where}: LoRA key {w.source!r} does not fit layer {name!r} of "
                              f"{type(model).__name__} ([{layer.out_features}, "
                              f"{layer.in_features}]): down {list(w.down.shape)}, up "
                              f"{list(w.up.shape)}")
    ranks = {n: w.rank for n, w in weights.items()}
    alphas = {n: float(w.rank if w.alpha is None else w.alpha) for n, w in weights.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(r=r0, lora_alpha=a0, target_modules=sorted(weights),
                        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
                        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != a0})
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    ref = next(model.parameters())
    state = {}
    for name, w in weights.items():
        state[f"{name}.lora_A.weight"] = w.down.to(ref.device, ref.dtype)
        state[f"{name}.lora_B.weight"] = w.up.to(ref.device, ref.dtype)
    result = set_peft_model_state_dict(model, state, adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"{where}: PEFT did not take {result.unexpected_keys[:5]}")
    set_adapters(model, [adapter_name], [1.0])


def list_adapters(model: nn.Module | None) -> list[str]:
    if model is None or not hasattr(model, "peft_config"):
        return []
    return list(model.peft_config)


def active_adapters(model: nn.Module | None) -> list[str]:
    layers = _tuner_layers(model) if list_adapters(model) else []
    return list(layers[0].active_adapters) if layers else []


def set_adapters(model: nn.Module, names: list[str], weights: list[float]) -> None:
    """diffusers' ``set_weights_and_activate_adapters``: these adapters run, each at its weight."""
    for layer in _tuner_layers(model):
        layer.set_adapter(names)
        for name, weight in zip(names, weights):
            layer.set_scale(name, 1.0 if weight is None else weight)


def enable(model: nn.Module, enabled: bool) -> None:
    for layer in _tuner_layers(model):
        layer.enable_adapters(enabled)


@contextlib.contextmanager
def call_scale(model: nn.Module | None, scale):
    """Every adapter scaled by ``scale`` inside the block (``joint_attention_kwargs``); the
    scalings are put back as they were, not divided again."""
    if scale is None or scale == 1.0 or not list_adapters(model):
        yield
        return
    layers = _tuner_layers(model)
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        layer.scale_layer(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def delete_adapters(model: nn.Module, names: list[str]) -> None:
    for layer in _tuner_layers(model):
        for name in names:
            if name in layer.lora_A:
                layer.delete_adapter(name)
    for name in names:
        model.peft_config.pop(name, None)


def fuse(model: nn.Module, lora_scale: float, names: list[str] | None) -> None:
    for layer in _tuner_layers(model):
        base = layer.get_base_layer()
        todo = [n for n in (names or layer.active_adapters)
                if n in layer.lora_A and n not in layer.merged_adapters]
        if not todo:
            continue
        if not hasattr(layer, "_dq_original"):
            layer._dq_original = base.weight.data
        delta = sum(lora_scale * layer.get_delta_weight(n).float() for n in todo)
        base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        layer.merged_adapters.extend(todo)


def unfuse(model: nn.Module) -> None:
    for layer in _tuner_layers(model):
        original = layer.__dict__.pop("_dq_original", None)
        if original is not None:
            layer.get_base_layer().weight.data = original
        layer.merged_adapters.clear()


def unload(model: nn.Module) -> None:
    """Put every base layer back in place of its PEFT wrapper; fused weights stay fused."""
    for name, module in list(model.named_modules()):
        if name and _is_tuner(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def _is_tuner(module) -> bool:
    if "peft" not in sys.modules:  # no PEFT layer exists before PEFT is imported
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name`` as ``<module>.lora_A.weight`` / ``.lora_B.weight`` (+ ``.alpha``
    where alpha is not the rank)."""
    out = {}
    for name, module in model.named_modules():
        if _is_tuner(module) and adapter_name in module.lora_A:
            out[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight.detach()
            out[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight.detach()
            alpha, rank = module.lora_alpha[adapter_name], module.r[adapter_name]
            if alpha != rank:
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out
