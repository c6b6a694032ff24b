"""Single files of the families diffquant loads through diffusers: keys converted by diffusers.

A Wan, Qwen-Image, SD3.5, HunyuanVideo, LTX-Video ... checkpoint shared as one ``.gguf`` or
``.safetensors`` file carries the original code's key names. diffusers keeps one converter per
family (``diffusers.loaders.single_file_utils.convert_*_to_diffusers``, listed in its
``SINGLE_FILE_LOADABLE_CLASSES``); this module runs that converter, as diffusers'
``from_single_file`` does, and hands the converted tensors to diffquant's loader
(``single_file.load_planned``): GGUF blocks stay blocks in ``GGUFLinear`` layers, other backends
quantize the decoded weights, nothing is written again here.

The converters take the whole state dict, so the file is read once, whole, at its stored size
(quantized blocks for a GGUF file), the way diffusers reads it; quantized tensors travel through
them as diffusers' ``GGUFParameter``, which keeps their ggml type through the slicing and
concatenation a converter does (both run along rows, where ggml blocks never cross).

Example:
    >>> import torch
    >>> from diffquant import GGUFQuantizationConfig, diffusers_class
    >>> Wan = diffusers_class("WanTransformer3DModel")                             # doctest: +SKIP
    >>> t = Wan.from_single_file("wan2.1-t2v-14b-Q4_0.gguf", config="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ...         quantization_config=GGUFQuantizationConfig(torch.bfloat16))         # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .configuration import read_json
from .errors import CheckpointError, ConfigError
from .hub import resolve_dir
from .ops.formats.gguf import FLOAT_TYPES, GGMLType, logical_shape
from .single_file import Piece, _Source, load_planned, open_single_file


class _ConvertedSource:
    """A converted state dict in ``_Source``'s shape: ``entries`` {key: (logical shape, ggml
    type or None)} and ``read`` (uint8 blocks for a quantized tensor, else the float tensor)."""

    def __init__(self, path: Path, tensors: dict):
        self.path, self._tensors, self.entries = path, {}, {}
        for key, value in tensors.items():
            qtype = getattr(value, "quant_type", None)
            if qtype is None:
                self._tensors[key], self.entries[key] = value, (tuple(value.shape), None)
                continue
            qtype = GGMLType(int(qtype))
            blocks = torch.Tensor._make_subclass(torch.Tensor, value, False)  # the plain uint8 bytes
            self._tensors[key] = blocks
            self.entries[key] = (logical_shape(tuple(blocks.shape), qtype), qtype)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors.pop(name)  # each tensor is read once; the model keeps it


def _converter(cls):
    """(diffusers' class name, its entry of SINGLE_FILE_LOADABLE_CLASSES) for ``cls``."""
    from diffusers.loaders.single_file_model import (SINGLE_FILE_LOADABLE_CLASSES,
                                                     _get_single_file_loadable_mapping_class)

    name = _get_single_file_loadable_mapping_class(cls)
    if name is None:
        raise ConfigError(f"{cls.__name__}.from_single_file: diffusers has no converter from an "
                          "original single-file checkpoint for this class; load its diffusers "
                          "folder with from_pretrained instead")
    return name, SINGLE_FILE_LOADABLE_CLASSES[name]


def _read_all(source: _Source) -> dict:
    """Every tensor of the file: floats as they are, quantized blocks as diffusers'
    GGUFParameter (what its converters expect of a GGUF file)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from .quantizers.base import require

    tensors = {}
    for name, (_, qtype) in source.entries.items():
        data = source.read(name)
        if qtype is not None and qtype not in FLOAT_TYPES:
            ggml = require("gguf", "gguf").GGMLQuantizationType
            data = GGUFParameter(data, quant_type=ggml(int(qtype)))
        tensors[name] = data
    return tensors


def _model_config(cls, config, subfolder, mapping: dict, checkpoint: dict, overrides: dict,
                  path: Path, hub: dict) -> dict:
    """The model's config.json: ``config`` (a dict, a model folder, or a pipeline folder or hub
    id with its ``default_subfolder``), else the repository diffusers names for this file's
    model type (fetched through the hub cache)."""
    if isinstance(config, dict):
        return {**config, **overrides}
    if config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        try:
            found = fetch_diffusers_config(checkpoint)
        except (KeyError, ValueError, AttributeError, IndexError) as err:
            raise ConfigError(f"{path}: diffusers cannot tell which model this file holds ({err}); "
                              "pass config=<directory or hub id holding its config.json>") from err
        config, subfolder = found["pretrained_model_name_or_path"], subfolder or found.get("subfolder")
    default = mapping.get("default_subfolder")
    root = resolve_dir(config, allow_patterns=[cls.config_name, f"{subfolder or default}/{cls.config_name}"],
                       **hub)
    if subfolder is None and not (root / cls.config_name).is_file() and default:
        subfolder = default
    return {**read_json((root / subfolder if subfolder else root) / cls.config_name,
                        what="model config"), **overrides}


def _convert(cls, converter, checkpoint: dict, config: dict, kwargs: dict, path: Path) -> dict:
    """diffusers' converter over ``checkpoint`` unless its keys are already the model's."""
    with torch.device("meta"):
        expected = set(cls.from_config(config).state_dict())
    if set(checkpoint) == expected:
        return checkpoint
    accepted = inspect.signature(converter).parameters
    extra = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        converted = converter(checkpoint=checkpoint, config=config, **extra)
    except (KeyError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{path}: diffusers' converter {converter.__name__} failed on this "
                              f"file ({type(err).__name__}: {err}); is it a {cls.__name__} "
                              "checkpoint?") from err
    if not converted:
        raise CheckpointError(f"{path}: diffusers' converter {converter.__name__} found no "
                              f"{cls.__name__} weights in this file")
    return converted


def load_converted_single_file(cls, path, *, config=None, subfolder: str | None = None,
                               quantization_config=None, torch_dtype=None, device_map=None,
                               **kwargs):
    """``from_single_file`` of a class made by ``diffusers_class``: see this module's docstring."""
    torch_dtype, path, hub = open_single_file(cls, path, torch_dtype, kwargs)
    _, mapping = _converter(cls)
    overrides = cls.init_kwargs_from_config(kwargs, source="from_single_file arguments")
    source = _Source(path)
    try:
        checkpoint = _read_all(source)
    finally:
        source.close()
    config_dict = _model_config(cls, config, subfolder, mapping, checkpoint, overrides, path, hub)
    converted = _ConvertedSource(path, _convert(cls, mapping["checkpoint_mapping_fn"], checkpoint,
                                                config_dict, kwargs, path))
    del checkpoint
    plan = {key: Piece(key) for key in converted.entries}
    return load_planned(cls, converted, plan, config_dict, quantization_config, torch_dtype,
                        device_map)
