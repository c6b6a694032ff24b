"""The backend registry: one dict, one decorator, refuses duplicates.

Each backend file registers its quantizer and config class:

    @register_quantizer("torchao", TorchAoConfig)
    class TorchAoQuantizer(DiffusersQuantizer): ...

``DiffusersAutoQuantizer.from_config`` then resolves a config object or dict to a quantizer.

Example:
    >>> from diffquant.quantizers import DiffusersAutoQuantizer
    >>> q = DiffusersAutoQuantizer.from_config({"quant_method": "torchao", "quant_type": "int8wo"})
    >>> type(q).__name__
    'TorchAoQuantizer'
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .config import QuantizationConfigMixin

logger = logging.getLogger(__name__)

# registry key (quant_method, or "bitsandbytes_4bit"/"bitsandbytes_8bit") -> (quantizer, config)
AUTO_QUANTIZER_MAPPING: dict[str, type] = {}
AUTO_QUANTIZATION_CONFIG_MAPPING: dict[str, type] = {}


def register_quantizer(key: str, config_cls: type):
    """Class decorator registering a quantizer and its config under ``key``."""

    def wrap(quantizer_cls):
        if key in AUTO_QUANTIZER_MAPPING:
            raise ValueError(f"quantization method {key!r} is already registered by "
                             f"{AUTO_QUANTIZER_MAPPING[key].__name__}")
        AUTO_QUANTIZER_MAPPING[key] = quantizer_cls
        AUTO_QUANTIZATION_CONFIG_MAPPING[key] = config_cls
        return quantizer_cls

    return wrap


def registry_key(config: QuantizationConfigMixin) -> str:
    """The registry key of a config object (a config may refine it, as bitsandbytes does)."""
    key = getattr(config, "registry_key", None)
    return key() if callable(key) else str(config.quant_method)


class DiffusersAutoQuantizer:
    """Resolves configs (objects or dicts) to backend quantizers."""

    @classmethod
    def from_dict(cls, quantization_config_dict: dict) -> QuantizationConfigMixin:
        if not isinstance(quantization_config_dict, dict):
            raise ConfigError(f"quantization_config: expected a dict or a config object, got "
                              f"{type(quantization_config_dict).__name__}")
        d = dict(quantization_config_dict)
        if hasattr(d.get("quant_method"), "value"):  # an enum, as diffusers' to_dict() gives it
            d["quant_method"] = d["quant_method"].value
        method = d.get("quant_method")
        if d.get("load_in_8bit") or d.get("load_in_4bit"):  # legacy bitsandbytes dicts
            method = "bitsandbytes_4bit" if d.get("load_in_4bit") else "bitsandbytes_8bit"
        elif method is None:
            raise ConfigError("quantization_config has no 'quant_method' key; expected one of "
                              f"{supported_methods()}")
        elif str(method) == "bitsandbytes":
            method = "bitsandbytes_4bit"
        config_cls = AUTO_QUANTIZATION_CONFIG_MAPPING.get(str(method))
        if config_cls is None:
            raise ConfigError(f"Unknown quantization method {method!r}; supported methods are "
                              f"{supported_methods()}")
        return config_cls.from_dict(d)

    @classmethod
    def from_config(cls, quantization_config, **kwargs):
        """A quantizer for ``quantization_config``; kwargs (``pre_quantized``) go to its init."""
        if isinstance(quantization_config, dict):
            quantization_config = cls.from_dict(quantization_config)
        elif is_diffusers_config(quantization_config):
            # imported from diffusers beside diffquant's pipeline: the same fields, read as a
            # diffusers config.json's quantization_config is
            quantization_config = cls.from_dict(quantization_config.to_dict())
        if not isinstance(quantization_config, QuantizationConfigMixin):
            raise ConfigError(f"quantization_config: expected a diffquant quantization config "
                              f"(TorchAoConfig, BitsAndBytesConfig, ...), got "
                              f"{type(quantization_config).__name__}")
        key = registry_key(quantization_config)
        if key not in AUTO_QUANTIZER_MAPPING:
            raise ConfigError(f"Unknown quantization method {key!r}; supported methods are "
                              f"{supported_methods()}")
        return AUTO_QUANTIZER_MAPPING[key](quantization_config, **kwargs)

    @classmethod
    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args=None):
        """The checkpoint's config wins over the caller's, with a warning if both were given."""
        if quantization_config_from_args is not None:
            logger.warning("You passed quantization_config to from_pretrained, but the checkpoint "
                           "is already quantized; its own quantization_config is used.")
        if isinstance(quantization_config, dict):
            quantization_config = cls.from_dict(quantization_config)
        return quantization_config


def is_diffusers_config(obj) -> bool:
    """A diffusers quantization config object (diffusers.TorchAoConfig, ...), not diffquant's."""
    return type(obj).__module__.startswith("diffusers.") and hasattr(obj, "quant_method") \
        and callable(getattr(obj, "to_dict", None))


def supported_methods() -> list[str]:
    return sorted(AUTO_QUANTIZER_MAPPING)
