"""DiffusionPipeline: load and save a pipeline's components via model_index.json (moves and
offload: pipeline_devices.py).

A pipeline directory is diffusers' own: ``model_index.json`` names the pipeline class
(``_class_name``) and, per component, ``[library, class]``; each component lives in the folder
of that name. diffusers-library components load with diffquant's classes, transformers ones
(text encoders, tokenizers) through transformers. A PipelineQuantizationConfig decides which
components are quantized on load.

Example:
    >>> import torch
    >>> from diffquant import DiffusionPipeline
    >>> from diffquant.quantizers import PipelineQuantizationConfig
    >>> pipe = DiffusionPipeline.from_pretrained("pipe_dir", torch_dtype=torch.bfloat16,  # doctest: +SKIP
    ...     quantization_config=PipelineQuantizationConfig(
    ...         quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
    ...         components_to_quantize=["transformer"]))
    >>> pipe.save_pretrained("out")                                                      # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory
from .configuration import DIFFUSERS_FORMAT_VERSION, read_json
from .errors import ConfigError
from .hub import push_folder, resolve_dir, split_hub_kwargs
from .pipeline_components import DIFFUSERS_CLASSES  # noqa: F401 (read by the CLI)
from .pipeline_components import (PIPELINE_CLASSES, import_class, is_plain_folder_name,
                                  library_of, load_component, refuse_unsaveable, resolve_class,
                                  resolve_quant_configs)
# save_pretrained looks this name up here at call time, so tests can swap it for a spy
from .pipeline_components import save_component as _save_component
from .pipeline_devices import PipelineDevices
from .snapshot import pinned_load

logger = logging.getLogger(__name__)

INDEX_NAME = "model_index.json"


def _check_pipeline_quant_config(quantization_config):
    """The pipeline's quantization config as diffquant's (diffusers' own is converted)."""
    from .quantizers.pipeline_config import PipelineQuantizationConfig

    if type(quantization_config).__module__.startswith("diffusers.") and \
            type(quantization_config).__name__ == "PipelineQuantizationConfig":
        return PipelineQuantizationConfig.from_diffusers(quantization_config)
    if quantization_config is not None and not isinstance(quantization_config,
                                                           PipelineQuantizationConfig):
        raise ValueError(f"quantization_config: a pipeline takes a PipelineQuantizationConfig, got "
                         f"{type(quantization_config).__name__}; wrap it, e.g. "
                         "PipelineQuantizationConfig(quant_mapping={'transformer': config})")
    return quantization_config


# Weights of other frameworks that hub repositories carry beside PyTorch's
_OTHER_FRAMEWORKS = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.ot", "*.tflite"]


def _pipeline_root(name_or_path, overrides: dict, hub_kwargs: dict) -> Path:
    """The pipeline's directory; for a hub id, only what loading reads is fetched: its
    model_index.json first, then the folders of the components it names that the caller did not
    pass in. A whole snapshot of a Flux repository also holds the original single-file
    checkpoints at its root (~24 GB for FLUX.1-dev) and the transformer a caller replaces with a
    GGUF one."""
    if Path(os.fspath(name_or_path)).expanduser().is_dir():
        return resolve_dir(name_or_path)
    first = resolve_dir(name_or_path, allow_patterns=[INDEX_NAME], **hub_kwargs)
    index = read_json(first / INDEX_NAME, what="pipeline index")
    folders = sorted(k for k, v in index.items() if not k.startswith("_") and k not in overrides
                     and isinstance(v, (list, tuple)) and v and v[0] is not None
                     and is_plain_folder_name(k))
    return resolve_dir(name_or_path, allow_patterns=[INDEX_NAME, *(f"{k}/*" for k in folders)],
                       ignore_patterns=_OTHER_FRAMEWORKS, **hub_kwargs)


def _check_device_map(device_map):
    if device_map is None:
        return None
    try:
        from .modeling import parse_device_map

        return parse_device_map(device_map)
    except (RuntimeError, ConfigError) as err:
        raise ConfigError(f"device_map={device_map!r}: a pipeline takes None or one device such as "
                          "'cpu' or 'cuda' for all components; use enable_model_cpu_offload() to "
                          "spread memory instead") from err


def open_pipeline(name_or_path, quantization_config, device_map, kwargs: dict):
    """(quantization config as diffquant's, hub arguments popped from ``kwargs``, the local
    root, its model_index.json) for a pipeline's ``from_pretrained``; bad arguments fail first."""
    quantization_config = _check_pipeline_quant_config(quantization_config)
    _check_device_map(device_map)
    hub_kwargs = split_hub_kwargs(kwargs)
    root = _pipeline_root(name_or_path, kwargs, hub_kwargs)
    return quantization_config, hub_kwargs, root, read_json(root / INDEX_NAME,
                                                            what="pipeline index")


class DiffusionPipeline(PipelineDevices):
    """Base of diffquant's pipelines: components, loading, saving; device moves and offload come
    from PipelineDevices (pipeline_devices.py)."""

    model_cpu_offload_seq: str | None = None
    _optional_components: list[str] = []

    def __init__(self):
        self._component_names: list[str] = []
        self._offload_device: torch.device | None = None
        self._offload_hooks: list = []
        self._progress_bar_config: dict = {}
        self.name_or_path: str | None = None

    def register_modules(self, **components) -> None:
        """Record components (None allowed) as attributes and in ``self.components``."""
        for name, obj in components.items():
            if name not in self._component_names:
                self._component_names.append(name)
            setattr(self, name, obj)

    @property
    def components(self) -> dict:
        # read from the instance: under max_memory a component not loaded now is None here
        return {name: self.__dict__.get(name) for name in self._component_names}

    def _modules(self) -> list[tuple[str, nn.Module]]:
        # the loaded ones only: under a budget an unloaded component loads when read by name
        return [(n, c) for n in self._component_names
                if isinstance(c := self.__dict__.get(n), nn.Module)]

    def __getattr__(self, name: str):
        residency = self.__dict__.get("_residency")
        if residency is not None and name in residency.names:
            return residency.load(name)  # under max_memory: loaded when first needed
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    @pinned_load  # one tree for the whole load, however a save swaps the path meanwhile
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None,
                        quantization_config=None, variant: str | None = None,
                        use_safetensors: bool | None = None, device_map=None,
                        low_cpu_mem_usage: bool = True, max_memory=None, **kwargs):
        """Load every component named in ``model_index.json``; ``name=obj`` kwargs override one.

        ``max_memory`` ("16GB"): the text encoders are loaded only to encode and the transformer
        only to denoise, each reloaded from its folder when next needed, and the VAE decode is
        tiled when it would not fit (diffquant.budget); on an accelerator, components are placed
        as ``enable_model_cpu_offload`` places them. None (default): everything stays loaded.

        Example:
            >>> pipe = DiffusionPipeline.from_pretrained("pipe_dir", transformer=my_model)  # doctest: +SKIP
        """
        quantization_config, hub_kwargs, root, index = open_pipeline(
            pretrained_model_name_or_path, quantization_config, device_map, kwargs)
        index_path = root / INDEX_NAME
        pipeline_cls = cls._pipeline_class(index, index_path)
        if not issubclass(pipeline_cls, DiffusionPipeline):  # diffusers' class: its own loading
            if max_memory is not None:
                raise ConfigError(f"{index_path}: max_memory= is offered for diffquant's own "
                                  f"pipelines (Flux, Flux Kontext, Chroma), not for diffusers' "
                                  f"{pipeline_cls.__name__}; load without it and call "
                                  "enable_model_cpu_offload() on an accelerator")
            return pipeline_cls.from_pretrained(
                pretrained_model_name_or_path, torch_dtype=torch_dtype,
                quantization_config=quantization_config, variant=variant,
                use_safetensors=use_safetensors, device_map=device_map,
                low_cpu_mem_usage=low_cpu_mem_usage, **hub_kwargs, **kwargs)
        entries = {k: v for k, v in index.items() if not k.startswith("_")}
        pipeline_cls._check_components(index_path, entries, kwargs, quantization_config)
        load_kwargs = dict(torch_dtype=torch_dtype, quantization_config=quantization_config,
                           variant=variant, use_safetensors=use_safetensors,
                           device_map=device_map, low_cpu_mem_usage=low_cpu_mem_usage)
        # Every class and quantization config first: a bad entry, or a config that a component's
        # library rejects, fails before any component is loaded (and quantized).
        classes = {n: resolve_class(index_path, n, entries[n]) for n in pipeline_cls._expected()
                   if n in entries and n not in kwargs}
        load_kwargs["quant_configs"] = resolve_quant_configs(quantization_config, classes)
        deferred = {}
        if max_memory is not None:  # the phase components load when first needed
            from .budget.residency import deferred_components

            deferred = deferred_components(classes)
        components = pipeline_cls._load_components(
            root, index_path, entries, {n: None if n in deferred else c for n, c in classes.items()},
            kwargs, load_kwargs)
        pipe = pipeline_cls(**components)
        pipe.name_or_path = str(pretrained_model_name_or_path)
        if max_memory is not None:
            from .budget.residency import attach_to_pipeline

            attach_to_pipeline(pipe, max_memory, root, index_path, classes, deferred, load_kwargs)
        return pipe

    @classmethod
    def _expected(cls) -> list[str]:
        """The component names ``__init__`` takes, in its order."""
        params = inspect.signature(cls.__init__).parameters
        return [n for n in params if n != "self" and params[n].kind not in
                (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]

    @classmethod
    def _check_components(cls, index_path: Path, entries: dict, kwargs: dict,
                          quantization_config) -> None:
        """Refuse unsafe folder names and unknown arguments; warn about what will be ignored."""
        expected = cls._expected()
        for name in entries:
            if not is_plain_folder_name(name):
                raise ConfigError(f"{index_path}: component key {name!r} is not a plain folder name; "
                                  "component names must not contain '/', '\\' or '..'")
        ignored = sorted(set(entries) - set(expected))
        if ignored:
            logger.warning("%s: %s does not take components %s; ignoring them", index_path,
                           cls.__name__, ignored)
        unknown_kwargs = sorted(set(kwargs) - set(expected))
        if unknown_kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained: unknown arguments {unknown_kwargs}; "
                            f"components are {expected}")
        if quantization_config is not None:
            lacking = sorted(quantization_config.requested_components() - set(entries))
            for name in lacking:
                logger.warning("quantization_config names component %r, which %s (%s) does not "
                               "have; it is ignored", name, cls.__name__, index_path)

    @classmethod
    def _load_components(cls, root: Path, index_path: Path, entries: dict, classes: dict,
                         kwargs: dict, load_kwargs: dict) -> dict:
        """Each component ``__init__`` takes: passed in ``kwargs``, or loaded from its folder."""
        from tqdm.auto import tqdm

        params = inspect.signature(cls.__init__).parameters
        components = {}
        # One bar over the components, as diffusers shows; the postfix names the one loading
        # (and quantizing) now. TQDM_DISABLE=1 silences it.
        bar = tqdm(cls._expected(), desc="Loading pipeline components...")
        for name in bar:
            bar.set_postfix_str(name, refresh=False)
            if name in kwargs:
                components[name] = kwargs[name]
            elif name in entries:
                components[name] = None if classes[name] is None else \
                    load_component(root, index_path, name, classes[name], load_kwargs)
            elif params[name].default is inspect.Parameter.empty:
                raise ConfigError(f"{index_path}: {cls.__name__} needs component {name!r}, "
                                  f"which the file does not list; pass {name}=... to provide it")
        return components

    @classmethod
    def _pipeline_class(cls, index: dict, index_path: Path):
        if cls is not DiffusionPipeline:
            return cls
        name = index.get("_class_name")
        if not isinstance(name, str):
            raise ConfigError(f"{index_path}: key '_class_name' should name the pipeline class, "
                              f"got {name!r}")
        if name in PIPELINE_CLASSES:
            return import_class(name, PIPELINE_CLASSES)
        # any other pipeline: diffusers' class with diffquant's components (diffusers_pipelines.py)
        from .pipelines.diffusers_pipelines import diffusers_pipeline_class

        return diffusers_pipeline_class(name, where=str(index_path))

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None,
                        push_to_hub: bool = False, **unused) -> None:
        """Write every component into its folder plus model_index.json, atomically as a whole.

        Either the whole new pipeline is at ``save_directory`` afterwards, or (on any error) the
        one that was there before.

        Example:
            >>> pipe.save_pretrained("out", max_shard_size="200MB")   # doctest: +SKIP

        ``push_to_hub=True`` then uploads the folder with huggingface_hub (``repo_id``, default
        the folder's name; ``private``, ``token``, ``commit_message``, ``create_pr``).
        """
        if self.__dict__.get("_residency") is not None:
            raise ConfigError(f"{type(self).__name__}.save_pretrained: this pipeline was loaded "
                              "with max_memory, so its components are loaded one phase at a "
                              "time; load it without max_memory to save it")
        save_pipeline(type(self).__name__, self.components, save_directory,
                      safe_serialization=safe_serialization, variant=variant,
                      max_shard_size=max_shard_size, push_to_hub=push_to_hub, **unused)

    # -- progress --------------------------------------------------------------------------
    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar configured by set_progress_bar_config()."""
        from tqdm.auto import tqdm

        if iterable is not None:
            return tqdm(iterable, **self._progress_bar_config)
        return tqdm(total=total, **self._progress_bar_config)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)


def save_pipeline(class_name: str, components: dict, save_directory: str | os.PathLike,
                  safe_serialization: bool = True, variant: str | None = None,
                  max_shard_size: int | str | None = None, push_to_hub: bool = False,
                  options: dict | None = None, entry=None, **unused) -> None:
    """``save_pretrained`` of a pipeline named ``class_name``: every component into its folder
    plus model_index.json, atomically as a whole. ``options`` are further model_index.json
    entries (a diffusers pipeline's init options); ``entry(obj)`` gives a component's
    ``[library, class]`` (default: diffusers' library for diffquant's models)."""
    if not safe_serialization:
        raise ValueError("safe_serialization=False: diffquant writes only safetensors "
                         "(pickle files can run code when loaded)")
    refuse_unsaveable(components)  # before anything is written
    entry = entry or (lambda obj: [library_of(obj), type(obj).__name__])
    index = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
             **(options or {})}
    with atomic_directory(save_directory) as tmp:
        for name, obj in components.items():
            if obj is None:
                index[name] = [None, None]
                continue
            _save_component(obj, tmp / name, variant, max_shard_size)
            index[name] = list(entry(obj))
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    push_folder(save_directory, {**unused, "push_to_hub": push_to_hub})
