"""FluxLoraLoaderMixin: diffusers' LoRA methods on Flux-family pipelines.

The transformer takes its adapters as diffquant's low-rank branches (``LoraModelMixin``), the
CLIP text encoder as PEFT layers (``text_encoder.py``); the methods below keep both in step,
with diffusers' names and semantics: a loaded adapter is the only active one, ``set_adapters``
picks adapters and weights, ``joint_attention_kwargs={"scale": s}`` scales them for one call.

Example:
    >>> pipe.load_lora_weights("lora.safetensors", adapter_name="style")       # doctest: +SKIP
    >>> pipe.load_lora_weights("org/repo", weight_name="detail.safetensors",   # doctest: +SKIP
    ...                        adapter_name="detail")
    >>> pipe.set_adapters(["style", "detail"], adapter_weights=[1.0, 0.5])     # doctest: +SKIP
    >>> image = pipe("a cat", joint_attention_kwargs={"scale": 0.8}).images[0] # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging

import torch

from ..errors import ConfigError
from . import text_encoder as te
from .files import read_lora, write_lora
from .formats import convert, to_diffusers

logger = logging.getLogger(__name__)


class _hybridmethod:
    """A method that receives the instance, or the class when called on it (diffusers'
    ``save_lora_weights`` is a classmethod taking the layers; on a pipeline it may take them
    from the pipeline's own adapters)."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        return functools.partial(self.func, obj if obj is not None else cls)


class FluxLoraLoaderMixin:
    """LoRA loading and switching for pipelines with a ``transformer`` and a ``text_encoder``."""

    _lora_loadable_modules = ["transformer", "text_encoder"]
    transformer_name = "transformer"
    text_encoder_name = "text_encoder"

    @property
    def joint_attention_kwargs(self) -> dict | None:
        """The current call's ``joint_attention_kwargs`` (diffusers' property)."""
        return getattr(self, "_joint_attention_kwargs", None)

    @property
    def lora_scale(self) -> float:
        return (self.joint_attention_kwargs or {}).get("scale", 1.0)

    def _clip(self):
        return getattr(self, self.text_encoder_name, None)

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, return_alphas: bool = False,
                        **kwargs):
        """A LoRA file in diffusers' form (``transformer.<module>.lora_A.weight`` ...), whatever
        format it was written in; with ``return_alphas``, also ``{<module>.alpha: alpha}``.

        Example:
            >>> sd = FluxPipeline.lora_state_dict("kohya_lora.safetensors")   # doctest: +SKIP
        """
        kwargs.pop("return_lora_metadata", None)
        sd, metadata, where = read_lora(pretrained_model_name_or_path_or_dict,
                                        kwargs.pop("weight_name", None),
                                        kwargs.pop("subfolder", None), **kwargs)
        state_dict, alphas = to_diffusers(convert(sd, where, metadata)[0])
        return (state_dict, alphas) if return_alphas else state_dict

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs) -> None:
        """Load a LoRA (a file, folder, hub id or state dict; ``weight_name=`` picks the file)
        into the transformer and, where the file has CLIP keys, the text encoder.

        Example:
            >>> pipe.load_lora_weights("lora.safetensors", adapter_name="a")   # doctest: +SKIP
        """
        if hotswap:
            raise ConfigError("load_lora_weights(hotswap=True) is not supported; delete_adapters() "
                              "and load the new one")
        if self.__dict__.get("_residency") is not None:
            raise ConfigError(
                "load_lora_weights on a pipeline loaded with max_memory: its transformer and "
                "text encoders are reloaded from their folders for each phase, which would drop "
                "the adapter; load the pipeline without max_memory, or fuse_lora() and "
                "save_pretrained() a copy and load that under the budget")
        kwargs.pop("low_cpu_mem_usage", None)
        sd, metadata, where = read_lora(pretrained_model_name_or_path_or_dict,
                                        kwargs.pop("weight_name", None),
                                        kwargs.pop("subfolder", None), **kwargs)
        transformer = getattr(self, self.transformer_name)
        weights, ignored = convert(sd, where, metadata, widths=transformer.lora_widths)
        parts = {}
        for key, w in weights.items():
            comp, _, module = key.partition(".")
            parts.setdefault(comp, {})[module] = w
        name = adapter_name or f"default_{len(transformer.list_adapters())}"
        clip = parts.pop(self.text_encoder_name, None) or {}
        usable = te.resolve(self._clip(), clip, where) if te.peft_installed() else {}
        if clip and not usable:
            ignored += sorted({w.source for w in clip.values()})
        clip = usable
        for comp, extra in parts.items():
            if comp != self.transformer_name:
                ignored += sorted({w.source for w in extra.values()})
        if ignored:
            logger.warning("%s: %d LoRA keys ignored (DoRA scales, T5, diff tensors, or text-"
                           "encoder layers that this pipeline's %s (%s) cannot take%s): %s", where,
                           len(ignored), self.text_encoder_name, type(self._clip()).__name__,
                           "" if te.peft_installed() else "; CLIP LoRAs need PEFT: pip install "
                           "'diffquant[lora]'", ", ".join(ignored[:10]))
        if not parts.get(self.transformer_name) and not clip:
            raise ConfigError(f"{where}: no LoRA layer of this pipeline's transformer or text "
                              "encoder in the file")
        if parts.get(self.transformer_name):
            transformer.add_lora(parts[self.transformer_name], name, where)
        if clip:
            try:
                te.add_adapter(self._clip(), clip, name, where)
            except BaseException:
                if name in transformer.list_adapters():
                    transformer.delete_adapters(name)
                raise

    # -- which adapters run ------------------------------------------------------------------
    def get_list_adapters(self) -> dict[str, list[str]]:
        out = {self.transformer_name: getattr(self, self.transformer_name).list_adapters(),
               self.text_encoder_name: te.list_adapters(self._clip())}
        return {k: v for k, v in out.items() if v}

    def get_active_adapters(self) -> list[str]:
        """The active adapters of the last component that has adapters (the text encoder's when
        it has any, else the transformer's), as diffusers answers."""
        if te.list_adapters(self._clip()):
            return te.active_adapters(self._clip())
        return getattr(self, self.transformer_name).active_adapters()

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Run ``adapter_names`` (a name or list) at ``adapter_weights`` (default 1.0 each).

        Example:
            >>> pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])   # doctest: +SKIP
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) \
            else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"set_adapters: {len(names)} adapters but {len(weights)} weights")
        everywhere = {n for names_ in self.get_list_adapters().values() for n in names_}
        missing = [n for n in names if n not in everywhere]
        if missing:
            raise ConfigError(f"set_adapters: {missing} not loaded (loaded: {sorted(everywhere)})")
        transformer = getattr(self, self.transformer_name)
        for model, have in ((transformer, transformer.list_adapters()),
                            (self._clip(), te.list_adapters(self._clip()))):
            pick = [(n, w) for n, w in zip(names, weights) if n in have]
            if model is transformer:
                transformer.set_adapters([n for n, _ in pick], [w for _, w in pick])
            elif have:
                te.set_adapters(model, [n for n, _ in pick], [w for _, w in pick])

    def disable_lora(self) -> None:
        getattr(self, self.transformer_name).disable_lora()
        if te.list_adapters(self._clip()):
            te.unfuse(self._clip())
            te.enable(self._clip(), False)

    def enable_lora(self) -> None:
        getattr(self, self.transformer_name).enable_lora()
        if te.list_adapters(self._clip()):
            te.enable(self._clip(), True)

    def delete_adapters(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        transformer = getattr(self, self.transformer_name)
        mine = [n for n in names if n in transformer.list_adapters()]
        if mine:
            transformer.delete_adapters(mine)
        clip = [n for n in names if n in te.list_adapters(self._clip())]
        if clip:
            te.delete_adapters(self._clip(), clip)
        unknown = set(names) - set(mine) - set(clip)
        if unknown:
            raise ConfigError(f"delete_adapters: {sorted(unknown)} not loaded")

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Remove every adapter (fused weights stay fused, as in diffusers)."""
        getattr(self, self.transformer_name).unload_lora()
        if te.list_adapters(self._clip()):
            te.unload(self._clip())

    # -- fusing ------------------------------------------------------------------------------
    def fuse_lora(self, components=("transformer", "text_encoder"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None, **kwargs) -> None:
        """Merge the adapters into the weights (quantized ones quantized again in their format);
        ``unfuse_lora()`` restores the original weights exactly."""
        if self.transformer_name in components:
            getattr(self, self.transformer_name).fuse_lora(lora_scale, safe_fusing, adapter_names)
        if self.text_encoder_name in components and te.list_adapters(self._clip()):
            te.fuse(self._clip(), lora_scale, adapter_names)

    def unfuse_lora(self, components=("transformer", "text_encoder"), **kwargs) -> None:
        if self.transformer_name in components:
            getattr(self, self.transformer_name).unfuse_lora()
        if self.text_encoder_name in components and te.list_adapters(self._clip()):
            te.unfuse(self._clip())

    # -- saving ------------------------------------------------------------------------------
    @_hybridmethod
    def save_lora_weights(owner, save_directory, transformer_lora_layers=None,
                          text_encoder_lora_layers=None, is_main_process: bool = True,
                          weight_name: str | None = None, save_function=None,
                          safe_serialization: bool = True, adapter_name: str | None = None,
                          **kwargs):
        """Write LoRA layers as one safetensors file in diffusers' layout. As diffusers' classmethod
        it takes the layers (state dicts); on a pipeline without them, it saves the pipeline's
        adapter ``adapter_name`` (default: the first active one).

        Example:
            >>> pipe.save_lora_weights("out", adapter_name="style")   # doctest: +SKIP
        """
        if not safe_serialization or save_function is not None:
            raise ValueError("save_lora_weights: diffquant writes only safetensors (no "
                             "save_function, no pickle)")
        if transformer_lora_layers is None and text_encoder_lora_layers is None:
            if isinstance(owner, type):
                raise ConfigError("save_lora_weights: pass transformer_lora_layers and/or "
                                  "text_encoder_lora_layers, or call it on a pipeline")
            transformer = getattr(owner, owner.transformer_name)
            name = adapter_name or (owner.get_active_adapters() or [None])[0]
            if name in transformer.list_adapters():
                transformer_lora_layers = transformer.lora_adapter_state_dict(name)
            if name in te.list_adapters(owner._clip()):
                text_encoder_lora_layers = te.state_dict(owner._clip(), name)
            if transformer_lora_layers is None and text_encoder_lora_layers is None:
                raise ConfigError(f"save_lora_weights: no adapter {name!r} in this pipeline")
        tensors = {}
        for prefix, layers in ((owner.transformer_name, transformer_lora_layers),
                               (owner.text_encoder_name, text_encoder_lora_layers)):
            for key, value in _as_tensors(layers).items():
                tensors[f"{prefix}.{key}"] = value
        if is_main_process:
            return write_lora(save_directory, tensors, weight_name)
        return None


def _as_tensors(layers) -> dict[str, torch.Tensor]:
    if layers is None:
        return {}
    if isinstance(layers, torch.nn.Module):
        return layers.state_dict()
    out = {}
    for key, value in layers.items():
        if isinstance(value, torch.nn.Module):
            out.update({f"{key}.{k}": v for k, v in value.state_dict().items()})
        else:
            out[key] = value
    return out
