"""A pipeline's components on disk: which class each model_index.json entry names, and loading
and saving one component folder (diffquant models, transformers models, tokenizers, schedulers).

DiffusionPipeline (pipeline.py) reads model_index.json and calls these once per component.

Example:
    >>> from diffquant.pipeline_components import resolve_class
    >>> resolve_class("model_index.json", "vae", ["diffusers", "AutoencoderKL"]).__name__
    'AutoencoderKL'
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from torch import nn

from .errors import CheckpointError, ConfigError

# diffusers-library classes diffquant implements: class name -> module.
DIFFUSERS_CLASSES = {
    "FluxTransformer2DModel": "diffquant.models.transformer_flux",
    "ChromaTransformer2DModel": "diffquant.models.transformer_chroma",
    "AutoencoderKL": "diffquant.models.autoencoder_kl",
    "FlowMatchEulerDiscreteScheduler": "diffquant.schedulers.flow_match_euler",
}
PIPELINE_CLASSES = {"FluxPipeline": "diffquant.pipelines.flux",
                    "FluxKontextPipeline": "diffquant.pipelines.flux_kontext",
                    "ChromaPipeline": "diffquant.pipelines.chroma"}


def import_class(name: str, table: dict):
    return getattr(importlib.import_module(table[name]), name)


def is_plain_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and not os.path.isabs(name) and ":" not in name


def resolve_class(index_path: Path, name: str, entry):
    """The class of component ``name`` from its ``[library, class]`` entry (None for [null, null])."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise ConfigError(f"{index_path}: key {name!r} should be [library, class], got {entry!r}")
    library, class_name = entry
    if library is None and class_name is None:
        return None
    if library in ("diffusers", "diffquant"):
        if class_name not in DIFFUSERS_CLASSES:
            raise ConfigError(f"{index_path}: key {name!r} names class {class_name!r} of library "
                              f"{library!r}, which diffquant does not implement; known classes: "
                              f"{sorted(DIFFUSERS_CLASSES)}. Pass the component yourself "
                              f"({name}=...) to override it")
        return import_class(class_name, DIFFUSERS_CLASSES)
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None) if isinstance(class_name, str) and \
            not class_name.startswith("_") else None
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"{index_path}: key {name!r} names class {class_name!r}, which "
                              f"transformers {transformers.__version__} does not have")
        return cls
    raise ConfigError(f"{index_path}: key {name!r} names library {library!r}; expected "
                      "'diffusers' or 'transformers'")


def library_of(obj) -> str:
    """The library a component is recorded under in model_index.json (ours load as diffusers')."""
    root = type(obj).__module__.split(".")[0]
    return "diffusers" if root == "diffquant" else root


def component_dtype(torch_dtype, name: str):
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(name, torch_dtype.get("default"))
    return torch_dtype


def is_serializable(module: nn.Module) -> bool:
    quantizer = getattr(module, "hf_quantizer", None)
    flag = getattr(quantizer, "is_serializable", True)
    # diffquant's quantizers have an is_serializable property, transformers' a method
    return bool(flag() if callable(flag) else flag)


def refuse_unsaveable(components: dict) -> None:
    """Raise naming the first component whose quantization its library cannot save."""
    from .errors import QuantizationError

    for name, module in components.items():
        if isinstance(module, nn.Module) and not is_serializable(module):
            method = module.hf_quantizer.quantization_config.quant_method
            raise QuantizationError(
                f"component {name!r} ({type(module).__name__}) is quantized with "
                f"{getattr(method, 'value', method)} by {library_of(module)}, which cannot save "
                "it; dequantize() it, quantize it with a backend that saves (e.g. torchao), or "
                "reload the original checkpoint")


def resolve_quant_configs(pipeline_config, classes: dict) -> dict:
    """{component name: quantization config} for the nn.Module components the config selects."""
    if pipeline_config is None:
        return {}
    from .modeling import ModelMixin

    configs = {}
    for name, cls in classes.items():
        if cls is not None and issubclass(cls, nn.Module):
            config = pipeline_config._resolve_quant_config(is_diffusers=issubclass(cls, ModelMixin),
                                                           module_name=name)
            if config is not None:
                configs[name] = config
    return configs


def load_component(root: Path, index_path: Path, name: str, component_cls, kw: dict):
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"{index_path}: component {name!r} ({component_cls.__name__}) has no "
                              f"folder {folder}; restore the folder or pass {name}=... yourself")
    if not issubclass(component_cls, nn.Module):  # schedulers, tokenizers: never quantized
        return component_cls.from_pretrained(folder)
    from .modeling import ModelMixin

    is_ours = issubclass(component_cls, ModelMixin)
    args = {"variant": kw["variant"], "use_safetensors": kw["use_safetensors"]}
    if kw["device_map"] is not None:
        args["device_map"] = kw["device_map"]
    if name in kw["quant_configs"]:
        args["quantization_config"] = kw["quant_configs"][name]
    dtype = component_dtype(kw["torch_dtype"], name)
    if is_ours:
        return component_cls.from_pretrained(folder, torch_dtype=dtype,
                                             low_cpu_mem_usage=kw["low_cpu_mem_usage"], **args)
    if args["variant"] is None:
        args.pop("variant")
    if dtype is not None:  # transformers 5 names it dtype; None means "auto" there, as in diffusers
        args["dtype"] = dtype
    return component_cls.from_pretrained(folder, **args)


def save_component(obj, folder: Path, variant, max_shard_size) -> None:
    from .modeling import ModelMixin

    if isinstance(obj, ModelMixin):
        folder.mkdir()
        obj.write_into(folder, variant=variant, max_shard_size=max_shard_size or "10GB")
    elif isinstance(obj, nn.Module):
        extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
        obj.save_pretrained(folder, variant=variant, **extra)
    elif hasattr(obj, "save_pretrained"):
        obj.save_pretrained(folder)
    else:
        raise ConfigError(f"component at {folder.name!r} is a {type(obj).__name__}, which has no "
                          "save_pretrained; it cannot be written into a pipeline directory")
