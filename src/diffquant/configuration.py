"""ConfigMixin: a model's or scheduler's init arguments <-> config.json.

The JSON is diffusers' own (``_class_name``, ``_diffusers_version`` and the init arguments),
so a directory written here loads in diffusers and the other way round.

Example:
    >>> from diffquant.schedulers import FlowMatchEulerDiscreteScheduler
    >>> s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    >>> FlowMatchEulerDiscreteScheduler.from_config(s.config).config.shift
    3.0
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# The diffusers version whose format we write; diffusers reads any version string here.
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# Keys that describe the file rather than an init argument.
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
              "_pre_quantization_dtype", "_ignore_files")


class FrozenDict(dict):
    """A dict whose keys are also attributes, frozen after construction (diffusers' shape)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        raise AttributeError(f"config is frozen; use register_to_config() to change {name!r}")

    def __setitem__(self, key, value):
        raise AttributeError(f"config is frozen; use register_to_config() to change {key!r}")

    def __getattr__(self, name):
        raise AttributeError(f"config has no field {name!r}; fields: {sorted(self)}")

    def __reduce__(self):
        # copy.deepcopy and pickle rebuild it from its items (the default refills a dict
        # subclass key by key, which a frozen one refuses)
        return type(self), (dict(self),)


def _json_value(value):
    """Turn a config value into something json.dumps accepts."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def read_json(path: str | os.PathLike, what: str = "config") -> dict:
    """Read a JSON object from ``path`` with an error that names the file on any failure."""
    from .limits import parse_json, read_bounded

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        raw = read_bounded(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what} file ({err.strerror})") from err
    data = parse_json(raw, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class ConfigMixin:
    """Records init arguments as ``self.config`` and reads/writes them as JSON.

    Subclasses set ``config_name`` (the file name) and decorate ``__init__`` with
    ``@register_to_config``.
    """

    config_name = "config.json"
    ignore_for_config: tuple = ()

    def register_to_config(self, **kwargs) -> None:
        current = dict(getattr(self, "_internal_dict", {}))
        current.update(kwargs)
        object.__setattr__(self, "_internal_dict", FrozenDict(current))

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def init_kwargs_from_config(cls, config: dict, source: str = "config") -> dict:
        """Split ``config`` into init arguments; warn about keys the class does not take."""
        params = inspect.signature(cls.__init__).parameters
        accepted = {n for n in params if n != "self" and params[n].kind not in
                    (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
        accepted -= set(cls.ignore_for_config)
        unknown = sorted(k for k in config if k not in accepted and not k.startswith("_")
                         and k != "quantization_config")
        if unknown:
            logger.warning("%s: ignoring keys that %s does not take: %s", source, cls.__name__,
                           ", ".join(unknown))
        return {k: v for k, v in config.items() if k in accepted}

    @classmethod
    def from_config(cls, config: dict | None = None, **overrides):
        """Build an instance from a config dict (or another instance's ``.config``)."""
        config = dict(config or {})
        config.update(overrides)
        init_kwargs = cls.init_kwargs_from_config(config)
        obj = cls(**init_kwargs)
        extra = {k: v for k, v in config.items() if k.startswith("_") and k in _META_KEYS
                 and k not in ("_class_name", "_diffusers_version", "_use_default_values")}
        if "quantization_config" in config and config["quantization_config"] is not None:
            extra["quantization_config"] = config["quantization_config"]
        if extra:
            obj.register_to_config(**extra)
        return obj

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                    **hub_kwargs) -> dict:
        """Read ``config_name`` from a directory or hub id (resolved through huggingface_hub)."""
        from .hub import resolve_file

        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder,
                            **hub_kwargs)
        return read_json(path, what=cls.config_name)

    # -- writing ---------------------------------------------------------------------------
    def to_json_string(self) -> str:
        data = dict(self.config)
        for key in ("_use_default_values", "_pre_quantization_dtype", "_ignore_files",
                    "_name_or_path"):
            data.pop(key, None)  # runtime bookkeeping, never part of the file
        data["_class_name"] = self.__class__.__name__
        data["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
        return json.dumps(_json_value(data), indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config_name`` into ``save_directory`` (created if needed)."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise CheckpointError(f"{save_directory}: is a file; expected a directory to save into")
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / self.config_name
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path


def register_to_config(init):
    """Decorator for ``__init__`` of a ConfigMixin: records every argument, defaults included."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        if not isinstance(self, ConfigMixin):
            raise TypeError(f"@register_to_config on {type(self).__name__}, which is not a ConfigMixin")
        params = list(inspect.signature(init).parameters.items())[1:]
        ignore = set(getattr(self, "ignore_for_config", ()))
        recorded = {}
        for (name, _), value in zip(params, args):
            recorded[name] = value
        for name, p in params:
            if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            if name not in recorded:
                recorded[name] = kwargs.get(name, p.default)
        recorded = {k: v for k, v in recorded.items() if k not in ignore}
        self.register_to_config(**recorded)
        init(self, *args, **kwargs)

    return inner


def config_value(config: dict, key: str, expected: type | tuple, source: str) -> Any:
    """Fetch ``config[key]`` and check its type, with an error naming the file and key."""
    value = config.get(key)
    if value is not None and not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{source}: key {key!r} should be {names}, got {type(value).__name__} {value!r}")
    return value
