"""LoraModelMixin: diffusers' LoRA methods on a model (``PeftAdapterMixin``'s names), on
unquantized and quantized layers alike.

Example:
    >>> transformer.load_lora_adapter("style.safetensors", adapter_name="style")   # doctest: +SKIP
    >>> transformer.set_adapters(["style"], [0.8])                                 # doctest: +SKIP
    >>> out = transformer(..., joint_attention_kwargs={"scale": 0.5})              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from ..errors import ConfigError, QuantizationError
from ..quantizers.base import QuantizedLinear
from .files import read_lora, write_lora
from .formats import LoraWeight, convert, to_diffusers
from .fuse import fuse_into, restore, snapshot
from .layer import LoraFactors, LoraLayers

logger = logging.getLogger(__name__)


def apply_lora_scale(kwargs_name: str = "joint_attention_kwargs"):
    """Decorate a model's ``forward``: ``kwargs_name``'s ``"scale"`` scales every LoRA for the
    call (diffusers' decorator of the same name); its other keys are ignored with a warning
    (diffquant has no attention processors to take them)."""
    def decorate(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            extra = dict(kwargs.get(kwargs_name) or {})
            scale = extra.pop("scale", 1.0)
            if extra:
                logger.warning("%s: %s %s are ignored (no attention processors in diffquant)",
                               type(self).__name__, kwargs_name, sorted(extra))
            with self.lora_call_scale(scale):
                return forward(self, *args, **kwargs)
        return wrapper
    return decorate


class LoraModelMixin:
    """The LoRA API of a diffquant model (the Flux and Chroma transformers)."""

    @property
    def lora_layers(self) -> LoraLayers | None:
        """The adapters' container (submodule ``_lora``), None without adapters."""
        return self._modules.get("_lora")

    # -- loading ----------------------------------------------------------------------------
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None =
                          "transformer", adapter_name: str | None = None, **kwargs) -> str:
        """Load a LoRA file (any format of lora/formats.py) into this model; returns its name.

        Example:
            >>> transformer.load_lora_adapter("lora.safetensors", adapter_name="a")  # doctest: +SKIP
            'a'
        """
        kwargs.pop("network_alphas", None)
        state_dict, metadata, where = read_lora(pretrained_model_name_or_path_or_dict,
                                                kwargs.pop("weight_name", None),
                                                kwargs.pop("subfolder", None), **kwargs)
        weights, _ = convert(state_dict, where, metadata, widths=self.lora_widths)
        prefix = (prefix or "transformer") + "."
        mine = {k[len(prefix):]: w for k, w in weights.items() if k.startswith(prefix)}
        if not mine:
            raise ConfigError(f"{where}: no LoRA layers for {type(self).__name__} (keys under "
                              f"{prefix!r})")
        return self.add_lora(mine, adapter_name, where)

    def lora_widths(self, module_name: str) -> int | None:
        """A layer's output width, to split a file's fused projections by this model's sizes."""
        try:
            return getattr(self.get_submodule(module_name), "out_features", None)
        except AttributeError:
            return None

    def add_lora(self, weights: dict[str, LoraWeight], adapter_name: str | None = None,
                 where: str = "LoRA") -> str:
        """Attach ``weights`` (module name -> factors) as adapter ``adapter_name`` (default
        ``default_<n>``), the only active one afterwards, as diffusers' load makes it."""
        lora = self._lora_layers()
        name = adapter_name or f"default_{len(lora.adapter_names)}"
        if name in lora.adapter_names:
            raise ConfigError(f"adapter name {name!r} is already in use in {type(self).__name__}; "
                              "pick another adapter_name or delete_adapters() it first")
        checked = {m: self._check_fits(m, w, where) for m, w in weights.items()}
        for module_name, (layer, dtype, device) in checked.items():
            w = weights[module_name]
            target = lora.target(module_name)
            target.adapters[name] = LoraFactors(w.down.to(device, dtype), w.up.to(device, dtype),
                                                w.alpha)
            if target.handle is None:
                target.attach(layer)
        lora.adapter_names.append(name)
        lora.state.weights[name] = 1.0
        lora.state.active = [name]
        return name

    def _check_fits(self, module_name: str, w: LoraWeight, where: str):
        """(layer, dtype, device) of ``module_name``, or an error naming file, key and layer."""
        cls = type(self).__name__
        try:
            layer = self.get_submodule(module_name)
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Linear, QuantizedLinear)):
            what = "has no such layer" if layer is None else f"has a {type(layer).__name__} there"
            raise ConfigError(f"{where}: LoRA key {w.source!r} targets layer {module_name!r}, but "
                              f"{cls} {what}; is this LoRA for another model?")
        rank = w.down.shape[0]
        if w.down.dim() != 2 or w.up.dim() != 2 or w.up.shape != (layer.out_features, rank) \
                or w.down.shape[1] > layer.in_features:
            raise ConfigError(f"{where}: LoRA key {w.source!r} does not fit layer {module_name!r} "
                              f"of {cls} ([{layer.out_features}, {layer.in_features}]): down "
                              f"{list(w.down.shape)}, up {list(w.up.shape)}, expected down "
                              f"[rank, {layer.in_features}] and up [{layer.out_features}, rank]")
        # the dtype of the activations the layer sees: its float weight or bias (the model's
        # torch_dtype), else the dtype it computes in
        ref = next((p for p in layer.parameters(recurse=False) if p.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else getattr(layer, "compute_dtype", None) or self.dtype
        any_tensor = next(iter(list(layer.parameters()) + list(layer.buffers())), None)
        return layer, dtype, any_tensor.device if any_tensor is not None else self.device

    def _lora_layers(self) -> LoraLayers:
        if self.lora_layers is None:
            self._lora = LoraLayers()   # a submodule: moved and counted with the model
        return self.lora_layers

    # -- which adapters run ------------------------------------------------------------------
    def active_adapters(self) -> list[str]:
        return list(self.lora_layers.state.active) if self.lora_layers is not None else []

    def list_adapters(self) -> list[str]:
        return list(self.lora_layers.adapter_names) if self.lora_layers is not None else []

    def set_adapters(self, adapter_names, weights=None) -> None:
        """Run ``adapter_names`` (a name or a list), each scaled by its weight (default 1.0).

        Example:
            >>> transformer.set_adapters(["a", "b"], [0.5, 1.0])   # doctest: +SKIP
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.list_adapters()
        missing = [n for n in names if n not in loaded]
        if not names and self.lora_layers is None:
            return
        if missing:
            raise ConfigError(f"set_adapters: {missing} not loaded in {type(self).__name__} "
                              f"(loaded: {loaded})")
        weights = [weights] * len(names) if not isinstance(weights, (list, tuple)) else list(weights)
        if len(weights) != len(names):
            raise ConfigError(f"set_adapters: {len(names)} adapters but {len(weights)} weights")
        for name, weight in zip(names, weights):
            if isinstance(weight, dict):
                raise ConfigError("set_adapters: per-block weight dicts are not supported for "
                                  f"{type(self).__name__}; give one number per adapter")
            self.lora_layers.state.weights[name] = 1.0 if weight is None else float(weight)
        self.lora_layers.state.active = names

    def disable_lora(self) -> None:
        """Run the base model only; fused adapters are unfused first (as PEFT's forward does)."""
        if self.lora_layers is not None:
            self.unfuse_lora()
            self.lora_layers.state.enabled = False

    def enable_lora(self) -> None:
        if self.lora_layers is not None:
            self.lora_layers.state.enabled = True

    @contextlib.contextmanager
    def lora_call_scale(self, scale: float):
        """Scale every adapter by ``scale`` inside the block (``joint_attention_kwargs``)."""
        if self.lora_layers is None or scale == 1.0:
            yield
            return
        state, before = self.lora_layers.state, self.lora_layers.state.call_scale
        state.call_scale = before * float(scale)
        try:
            yield
        finally:
            state.call_scale = before

    # -- removing ----------------------------------------------------------------------------
    def delete_adapters(self, adapter_names) -> None:
        """Remove adapters (a name or a list) and free their weights."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        loaded = self.list_adapters()
        for name in names:
            if name not in loaded:
                raise ConfigError(f"delete_adapters: {name!r} is not loaded (loaded: {loaded})")
            if any(name in t.fused for _, t in self.lora_layers.items()):
                raise QuantizationError(f"delete_adapters: {name!r} is fused into the weights; "
                                        "unfuse_lora() first")
        lora = self.lora_layers
        for module_name, target in lora.items():
            for name in names:
                if name in target.adapters:
                    del target.adapters[name]
            if not len(target.adapters):
                target.detach()
                del lora.targets[lora.key(module_name)]
        for name in names:
            lora.adapter_names.remove(name)
            lora.state.weights.pop(name)
        lora.state.active = [n for n in lora.state.active if n not in names]

    def unload_lora(self) -> None:
        """Remove every adapter; fused weights stay fused (diffusers' fuse-then-unload)."""
        if self.lora_layers is None:
            return
        for _, target in self.lora_layers.items():
            target.detach()
            target.saved = None
        del self._modules["_lora"]

    # -- fusing ------------------------------------------------------------------------------
    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Merge adapters (default: the active ones) into the weights, each at its set_adapters
        weight times ``lora_scale``; quantized layers are quantized again in their format.
        ``unfuse_lora()`` restores the stored weights exactly."""
        if self.lora_layers is None:
            return
        names = self.active_adapters() if adapter_names is None else list(adapter_names)
        missing = [n for n in names if n not in self.list_adapters()]
        if missing:
            raise ConfigError(f"fuse_lora: {missing} not loaded (loaded: {self.list_adapters()})")
        weights = self.lora_layers.state.weights
        for module_name, target in self.lora_layers.items():
            todo = [n for n in names if n in target.adapters and n not in target.fused]
            if not todo:
                continue
            layer = self.get_submodule(module_name)
            delta = sum(lora_scale * weights[n] * target.adapters[n].delta(layer.in_features)
                        for n in todo)
            if safe_fusing and not torch.isfinite(delta).all():
                raise QuantizationError(f"fuse_lora: adapter update of {module_name!r} is not finite")
            before = snapshot(layer)   # the originals at the first fuse; a rollback point
            try:
                fuse_into(layer, delta, self.config.get("_pre_quantization_dtype"))
            except BaseException:
                restore(before)
                raise
            target.saved = target.saved or before
            target.fused.update(todo)

    def unfuse_lora(self) -> None:
        """Put back every fused layer's original stored tensors (bit for bit)."""
        if self.lora_layers is None:
            return
        for _, target in self.lora_layers.items():
            if target.saved is not None:
                restore(target.saved)
                target.saved = None
            target.fused.clear()

    def dequantize(self):
        if any(t.saved is not None for _, t in
               (self.lora_layers.items() if self.lora_layers is not None else [])):
            raise QuantizationError("dequantize(): LoRA adapters are fused into quantized layers; "
                                    "unfuse_lora() (or unload_lora()) first")
        out = super().dequantize()
        for module_name, target in (self.lora_layers.items() if self.lora_layers is not None else []):
            target.attach(self.get_submodule(module_name))  # the layers are new nn.Linears
        return out

    # -- saving ------------------------------------------------------------------------------
    def lora_adapter_state_dict(self, adapter_name: str | None = None, prefix: str = "") -> dict:
        """Adapter ``adapter_name``'s factors in diffusers' form (``<prefix><module>.lora_A.
        weight``, ``.lora_B.weight``, ``.alpha`` where it has one)."""
        names = self.list_adapters()
        name = adapter_name or (self.active_adapters() or names or [None])[0]
        if name not in names:
            raise ConfigError(f"no adapter {name!r} in {type(self).__name__} (loaded: {names})")
        weights = {f"{prefix}{m}": LoraWeight(t.adapters[name].down.detach(),
                                               t.adapters[name].up.detach(), t.adapters[name].alpha)
                   for m, t in self.lora_layers.items() if name in t.adapters}
        sd, alphas = to_diffusers(weights)
        sd.update({k: torch.tensor(v, dtype=torch.float32) for k, v in alphas.items()})
        return sd

    def save_lora_adapter(self, save_directory, adapter_name: str | None = None,
                          upcast_before_saving: bool = False, safe_serialization: bool = True,
                          weight_name: str | None = None):
        """Write one adapter as ``pytorch_lora_weights.safetensors`` (diffusers' layout)."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: diffquant writes only safetensors")
        sd = self.lora_adapter_state_dict(adapter_name, prefix="transformer.")
        if upcast_before_saving:
            sd = {k: v.float() for k, v in sd.items()}
        return write_lora(save_directory, sd, weight_name)
