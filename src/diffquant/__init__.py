"""diffquant: load, run, save and reload diffusion pipelines with quantized components.

The public names follow diffusers, so switching is a change of import:

    >>> import torch
    >>> from diffquant import FluxPipeline, TorchAoConfig                      # doctest: +SKIP
    >>> from diffquant.quantizers import PipelineQuantizationConfig            # doctest: +SKIP
    >>> pipe = FluxPipeline.from_pretrained(                                   # doctest: +SKIP
    ...     quantization_config=PipelineQuantizationConfig(
    ...         quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
    ...         components_to_quantize=["transformer"]))

Names are imported on first use, so ``import diffquant`` stays cheap and a backend's optional
library is only needed when that backend is used. Any other diffusers model or pipeline class
(``diffquant.WanTransformer3DModel``, ``diffquant.StableDiffusion3Pipeline``) is diffusers' own
with diffquant's loading, quantization and saving (``diffusers_bridge.py``); those need diffusers
(``pip install 'diffquant[diffusers]'``).
"""

import importlib

from .backends import BACKENDS

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigMixin": "configuration", "register_to_config": "configuration",
    "ModelMixin": "modeling", "AutoModel": "auto_model",
    "DiffusionPipeline": "pipeline",
    "FluxPipeline": "pipelines.flux",
    "FluxKontextPipeline": "pipelines.flux_kontext",
    "ChromaPipeline": "pipelines.chroma",
    "FluxTransformer2DModel": "models.transformer_flux",
    "ChromaTransformer2DModel": "models.transformer_chroma",
    "AutoencoderKL": "models.autoencoder_kl",
    "FlowMatchEulerDiscreteScheduler": "schedulers.flow_match_euler",
    "QuantizationConfigMixin": "quantizers.config", "QuantizationMethod": "quantizers.config",
    "PipelineQuantizationConfig": "quantizers.pipeline_config",
    "DiffusersAutoQuantizer": "quantizers.auto",
    "DiffquantError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "QuantizationError": "errors", "BackendUnavailableError": "errors",
    "default_pipeline_path": "assets",
    "diffusers_class": "diffusers_bridge",
    "diffusers_pipeline_class": "pipelines.diffusers_pipelines",
    "export_gguf": "gguf_export", "export_t5_gguf": "t5_gguf", "load_t5_encoder_gguf": "t5_gguf",
}

# each backend's config class (backends.py: a backend is registered once, there)
_EXPORTS.update({config: f"quantizers.{module}" for module, config in BACKENDS.items()})
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None and name[:1].isupper():  # a diffusers class of a family not native here
        value = importlib.import_module(".pipelines.diffusers_pipelines", __name__) \
            .diffusers_attribute(name)
    elif module is None:
        raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
    else:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
