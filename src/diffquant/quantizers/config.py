"""QuantizationMethod and QuantizationConfigMixin: configs are data.

A config is fields plus validation; ``to_dict``/``from_dict`` round-trip through JSON, unknown
keys are refused by name, and equality compares every field (diffusers compares only
``quant_method``, so two different int8/int4 configs would compare equal there).

Example:
    >>> from diffquant import TorchAoConfig
    >>> c = TorchAoConfig("int8wo")
    >>> TorchAoConfig.from_dict(c.to_dict()) == c
    True
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from enum import Enum
from typing import Any

import torch

from ..errors import ConfigError


class QuantizationMethod(str, Enum):
    BITS_AND_BYTES = "bitsandbytes"
    GGUF = "gguf"
    QUANTO = "quanto"
    TORCHAO = "torchao"
    MODELOPT = "modelopt"

    def __str__(self) -> str:
        return self.value


def dtype_to_str(value):
    """torch.float16 -> "float16"; other values unchanged (configs hold dtypes, JSON holds names)."""
    return str(value).split(".")[-1] if isinstance(value, torch.dtype) else value


_KINDS = {"bool": ("True or False", lambda v: isinstance(v, bool)),
          "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          "positive int": ("an int > 0",
                           lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
          "number": ("a finite number", lambda v: isinstance(v, (int, float))
                     and not isinstance(v, bool) and math.isfinite(v)),
          "str": ("a string", lambda v: isinstance(v, str))}


def check_field(owner: str, field: str, value, kind: str, optional: bool = False):
    """``value`` if it is of ``kind`` (see _KINDS; None too where ``optional``), else a
    ConfigError naming ``owner.field``: a string "false" is not a bool, 64.0 not a group size,
    8.5 not a GGUF type.

    Example:
        >>> check_field("QuantoConfig", "weights_dtype", ["int8"], "str")
        Traceback (most recent call last):
        ...
        diffquant.errors.ConfigError: QuantoConfig.weights_dtype=['int8']: expected a string
    """
    what, ok = _KINDS[kind]
    if (value is None and optional) or ok(value):
        return value
    raise ConfigError(f"{owner}.{field}={value!r}: expected {what}{' or None' if optional else ''}")


def str_to_dtype(value, field: str, owner: str):
    """"bfloat16" or "torch.bfloat16" -> torch.bfloat16, with an error naming the field."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{owner}.{field}={value!r}: expected a torch dtype such as 'bfloat16'")
    return dtype


class QuantizationConfigMixin:
    """Base of every backend's config. Subclasses set ``quant_method`` in ``__init__``."""

    quant_method: QuantizationMethod

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every public field, JSON-ready (dtypes as names, enums as strings)."""
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if isinstance(value, Enum):
                value = value.value
            out[key] = dtype_to_str(copy.deepcopy(value))
        return out

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    @classmethod
    def _init_params(cls) -> set[str]:
        params = inspect.signature(cls.__init__).parameters
        return {n for n, p in params.items() if n != "self" and p.kind not in
                (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}

    # Keys written by to_dict that are not init arguments (derived state, or diffusers' extras).
    _derived_keys: tuple = ("quant_method",)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """Build a config from a dict; a key that is neither a field nor derived is an error."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a dict, got {type(config_dict).__name__}")
        data = {**config_dict, **kwargs}
        method = data.get("quant_method")
        own = getattr(cls, "_method_value", None)
        if method is not None and own is not None and str(method) not in own:
            raise ConfigError(f"{cls.__name__}.from_dict: quant_method={method!r}, expected "
                              f"{' or '.join(own)}")
        allowed = cls._init_params()
        unknown = sorted(k for k in data if k not in allowed and k not in cls._derived_keys)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(map(repr, unknown))}; "
                              f"expected some of {sorted(allowed)}")
        obj = cls(**{k: v for k, v in data.items() if k in allowed})
        return (obj, {}) if return_unused_kwargs else obj

    @classmethod
    def transformers_kwargs(cls, quant_kwargs: dict) -> dict:
        """``quant_kwargs`` for this backend's config class in transformers (the text encoders).

        PipelineQuantizationConfig's global mode uses it, so one set of kwargs quantizes
        diffquant and transformers components alike; backends whose names differ override it.
        """
        return dict(quant_kwargs)

    # aliases of CLI scheme names ("4bit" -> "nf4"); whether transformers quantizes its own
    # models (the text encoders) with this backend while loading them
    cli_aliases: dict = {}
    in_transformers = True

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        """The CLI's scheme names of this backend ("backend:scheme", spec.py) and the
        constructor kwargs each stands for."""
        return {}

    @classmethod
    def cpu_examples(cls) -> list["QuantizationConfigMixin"]:
        """Example configs of this backend that run on a CPU; the contract tests use every one."""
        return []

    # -- data semantics --------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(self.to_json_string())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in sorted(self.to_dict().items()))
        return f"{type(self).__name__}({fields})"

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()

    def _check_modules_list(self, value, field: str = "modules_to_not_convert"):
        """A list of module names/globs, or None; a single str is accepted as a one-item list."""
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{type(self).__name__}.{field}={value!r}: expected a list of module "
                              "names or glob patterns")
        return list(value)
