"""Quantization: configs, the backend registry, the lifecycle, the backends.

Importing this package registers every backend (their libraries are imported only when used).
"""

import importlib

from .auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, DiffusersAutoQuantizer,
                   register_quantizer, supported_methods)
from .base import DiffusersQuantizer, QuantizedLinear
from .config import QuantizationConfigMixin, QuantizationMethod

from ..backends import BACKENDS

# Each backend registers itself on import. A module that does not exist yet is skipped, so the
# registry always lists exactly the backends present in this install.
BACKEND_MODULES = tuple(BACKENDS)
for _name in BACKEND_MODULES:
    try:
        importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise


def __getattr__(name):
    if name == "PipelineQuantizationConfig":
        from .pipeline_config import PipelineQuantizationConfig

        return PipelineQuantizationConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING", "DiffusersAutoQuantizer",
           "DiffusersQuantizer", "PipelineQuantizationConfig", "QuantizationConfigMixin",
           "QuantizationMethod", "QuantizedLinear", "register_quantizer", "supported_methods"]
