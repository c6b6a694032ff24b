"""Any diffusers pipeline, its models loaded (and quantized) by diffquant.

``DiffusionPipeline.from_pretrained`` on a model_index.json whose ``_class_name`` diffquant does
not implement (``StableDiffusion3Pipeline``, ``WanPipeline``, ``QwenImagePipeline``, ...) returns
diffusers' pipeline class, so ``__call__``, its prompt encoding, schedulers and video or image
post-processing are diffusers' own, with components loaded as diffquant loads them:

- every diffusers model (transformer, UNet, VAE, even one diffquant implements natively) is
  diffusers' class with diffquant's loading (``diffusers_class``), quantized where the
  ``PipelineQuantizationConfig`` says;
- text encoders, tokenizers and processors through transformers, schedulers through diffusers,
  exactly as the native pipelines load them.

The class returned is a subclass of diffusers' (``isinstance(pipe, diffusers.WanPipeline)``) whose
``from_pretrained`` is the above and whose ``save_pretrained`` is diffquant's: atomic, refusing a
component that cannot be saved before anything is written, and writing model_index.json entries
diffusers reads (``["diffusers", "WanTransformer3DModel"]``), so the folder reloads in both.

Example:
    >>> import torch
    >>> from diffquant import DiffusionPipeline
    >>> from diffquant.quantizers import PipelineQuantizationConfig
    >>> pipe = DiffusionPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",   # doctest: +SKIP
    ...     quantization_config=PipelineQuantizationConfig(quant_backend="gguf",
    ...         quant_kwargs={"quant_type": "Q8_0", "compute_dtype": torch.bfloat16},
    ...         components_to_quantize=["transformer"]), torch_dtype=torch.bfloat16)
    >>> frames = pipe("a cat", num_frames=17, height=256, width=256).frames[0]      # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from ..diffusers_bridge import EXTRA, DiffusersModelMixin, diffusers_base, diffusers_class
from ..errors import ConfigError
from ..pipeline import INDEX_NAME, open_pipeline, save_pipeline
from ..pipeline_components import (is_plain_folder_name, load_component, resolve_class,
                                   resolve_quant_configs)

logger = logging.getLogger(__name__)

_CLASSES: dict[str, type] = {}


def diffusers_pipeline_class(name: str, where: str | None = None) -> type:
    """diffusers' pipeline class ``name`` with diffquant's loading and saving (one per name).

    Example:
        >>> Wan = diffusers_pipeline_class("WanPipeline")                           # doctest: +SKIP
        >>> pipe = Wan.from_pretrained("wan_dir", quantization_config=...)          # doctest: +SKIP
    """
    cls = _CLASSES.get(name)
    if cls is None:
        base = diffusers_base(name, "DiffusionPipeline", where)
        cls = _CLASSES.setdefault(name, type(name, (DiffusersPipelineMixin, base), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"diffusers' {name} with components loaded and saved by diffquant."}))
    return cls


def __getattr__(name: str):
    """``diffquant.pipelines.diffusers_pipelines.<Class>``: where pickle finds a class by name."""
    if name[:1].isupper():
        return diffusers_pipeline_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def diffusers_attribute(name: str):
    """``diffquant.<name>`` for a diffusers model or pipeline class diffquant does not implement."""
    try:
        import diffusers
    except ImportError:
        raise AttributeError(f"module 'diffquant' has no attribute {name!r}; if it is a diffusers "
                             "model or pipeline class, diffquant loads it through diffusers: pip "
                             f"install '{EXTRA}'") from None
    base = getattr(diffusers, name, None)
    if isinstance(base, type) and issubclass(base, diffusers.DiffusionPipeline):
        return diffusers_pipeline_class(name)
    if isinstance(base, type) and issubclass(base, diffusers.ModelMixin):
        return diffusers_class(name)
    raise AttributeError(f"module 'diffquant' has no attribute {name!r} (nor is it a model or "
                         f"pipeline class of diffusers {diffusers.__version__})")


def component_class(index_path: Path, name: str, entry):
    """The class of component ``name`` in a diffusers pipeline: diffusers' models with diffquant's
    loading, other diffusers classes (schedulers) and pipeline-local ones (``["stable_diffusion",
    "StableDiffusionSafetyChecker"]``) as they are, transformers' through ``resolve_class``."""
    import diffusers

    library, class_name = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
    if library in ("diffusers", "diffquant") and isinstance(class_name, str):
        base = getattr(diffusers, class_name, None)
        if isinstance(base, type) and issubclass(base, diffusers.ModelMixin):
            return diffusers_class(class_name)
        if isinstance(base, type) and hasattr(base, "from_pretrained"):
            return base
        raise ConfigError(f"{index_path}: key {name!r} names class {class_name!r}, which diffusers "
                          f"{diffusers.__version__} does not have; pass {name}=... yourself")
    module = getattr(diffusers.pipelines, library, None) if isinstance(library, str) and \
        library.isidentifier() and library != "transformers" else None
    if module is not None and isinstance(getattr(module, str(class_name), None), type):
        return getattr(module, class_name)
    return resolve_class(index_path, name, entry)


def _component_entry(obj) -> list:
    """``[library, class]`` as diffusers records it (diffquant's models as diffusers')."""
    if isinstance(obj, DiffusersModelMixin):
        return ["diffusers", type(obj).__name__]
    from diffusers.pipelines.pipeline_utils import _fetch_class_library_tuple

    return list(_fetch_class_library_tuple(obj))


class DiffusersPipelineMixin:
    """diffquant's ``from_pretrained`` and ``save_pretrained`` over a diffusers pipeline class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None,
                        quantization_config=None, variant: str | None = None,
                        use_safetensors: bool | None = None, device_map=None,
                        low_cpu_mem_usage: bool = True, **kwargs):
        """Load every component model_index.json names (``name=obj`` overrides one) and the
        pipeline's options (Wan 2.2's ``boundary_ratio``); see this module's docstring."""
        from tqdm.auto import tqdm

        quantization_config, _, root, index = open_pipeline(
            pretrained_model_name_or_path, quantization_config, device_map, kwargs)
        index_path = root / INDEX_NAME
        init, classes = cls._plan(index_path, index, kwargs, quantization_config)
        load_kwargs = dict(torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors,
                           device_map=device_map, low_cpu_mem_usage=low_cpu_mem_usage,
                           quant_configs=resolve_quant_configs(quantization_config, classes))
        bar = tqdm(list(classes), desc="Loading pipeline components...")
        for name in bar:
            bar.set_postfix_str(name, refresh=False)
            init[name] = None if classes[name] is None else \
                load_component(root, index_path, name, classes[name], load_kwargs)
        pipe = cls(**init)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    @classmethod
    def _plan(cls, index_path: Path, index: dict, kwargs: dict, quantization_config):
        """(init arguments known now, {component: class to load}) from model_index.json."""
        modules, options = cls._get_signature_keys(cls)  # diffusers': components, other options
        unknown = sorted(set(kwargs) - set(modules) - set(options))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained: unknown arguments {unknown}; "
                            f"components are {modules}, options {options}")
        entries = {k: v for k, v in index.items() if not k.startswith("_")}
        ignored = sorted(set(entries) - set(modules) - set(options))
        if ignored:
            logger.warning("%s: %s does not take %s; ignoring them", index_path, cls.__name__, ignored)
        for name in sorted((quantization_config.requested_components() if quantization_config
                            else set()) - set(entries)):
            logger.warning("quantization_config names component %r, which %s (%s) does not have; "
                           "it is ignored", name, cls.__name__, index_path)
        params = inspect.signature(cls.__init__).parameters
        init, classes = {}, {}
        for name in (n for n in params if n in modules or n in options):
            if name in kwargs:
                init[name] = kwargs[name]
            elif name in options:
                if name in entries:  # a pipeline option stored beside the components
                    init[name] = entries[name]
            elif name in entries:
                if not is_plain_folder_name(name):
                    raise ConfigError(f"{index_path}: component key {name!r} is not a plain folder "
                                      "name; component names must not contain '/', '\\' or '..'")
                classes[name] = component_class(index_path, name, entries[name])
            elif params[name].default is inspect.Parameter.empty:
                raise ConfigError(f"{index_path}: {cls.__name__} needs component {name!r}, which "
                                  f"the file does not list; pass {name}=... to provide it")
        return init, classes

    def save_pretrained(self, save_directory, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size=None,
                        push_to_hub: bool = False, **kwargs) -> None:
        """Every component into its folder plus model_index.json (with the pipeline's options),
        atomically as a whole; diffusers and diffquant both load the folder.

        Example:
            >>> pipe.save_pretrained("wan-int8")                              # doctest: +SKIP
        """
        _, options = self._get_signature_keys(self)
        saved = {k: v for k, v in self.config.items() if k in options}
        save_pipeline(type(self).__name__, self.components, save_directory,
                      safe_serialization=safe_serialization, variant=variant,
                      max_shard_size=max_shard_size, push_to_hub=push_to_hub, options=saved,
                      entry=_component_entry, **kwargs)


__all__ = ["DiffusersPipelineMixin", "component_class", "diffusers_attribute",
           "diffusers_pipeline_class"]
