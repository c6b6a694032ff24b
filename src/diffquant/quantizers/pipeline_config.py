"""PipelineQuantizationConfig: which component of a pipeline gets which quantization config.

Two modes, as in diffusers:
- global: ``quant_backend`` + ``quant_kwargs`` (+ optional ``components_to_quantize``); each
  component gets a fresh config of that backend, from diffquant's registry for diffquant models
  and from transformers' registry for transformers models (the text encoders);
- granular: ``quant_mapping`` maps component names to config objects (diffquant's or
  transformers').

Example:
    >>> from diffquant.quantizers import PipelineQuantizationConfig
    >>> pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
    ...                                 components_to_quantize="transformer")
    >>> pq.components_to_quantize
    ['transformer']
"""

from __future__ import annotations

import inspect
import logging

from ..errors import ConfigError
from .auto import AUTO_QUANTIZATION_CONFIG_MAPPING, DiffusersAutoQuantizer, is_diffusers_config

logger = logging.getLogger(__name__)


def transformers_config_mapping() -> dict:
    """transformers' backend name -> its quantization config class ({} without transformers)."""
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as mapping
    except ImportError:
        return {}
    return dict(mapping)


def _init_names(cls) -> tuple[set[str], bool]:
    params = inspect.signature(cls.__init__).parameters
    names = {n for n in params if n != "self"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return names - {"kwargs"}, takes_any


def _check_types(backend, kwargs, components, mapping) -> None:
    """Each field's type, by name, before anything iterates over it."""
    bad = [(n, v, want) for n, v, want, ok in (
        ("quant_backend", backend, "a backend name", backend is None or isinstance(backend, str)),
        ("quant_kwargs", kwargs, "a dict of keyword arguments", kwargs is None or
         isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)),
        ("components_to_quantize", components, "a component name or a list of them",
         components is None or isinstance(components, str) or isinstance(components, (list, tuple))
         and all(isinstance(c, str) for c in components)),
        ("quant_mapping", mapping, "component names as keys", not isinstance(mapping, dict)
         or all(isinstance(k, str) for k in mapping))) if not ok]  # a non-dict: _validate_mapping
    if bad:
        name, value, want = bad[0]
        raise ConfigError(f"PipelineQuantizationConfig.{name}={value!r}: expected {want}")


class PipelineQuantizationConfig:
    """Per-component quantization for DiffusionPipeline.from_pretrained(quantization_config=...)."""

    def __init__(self, quant_backend: str | None = None, quant_kwargs: dict | None = None,
                 components_to_quantize: list[str] | str | None = None,
                 quant_mapping: dict | None = None):
        _check_types(quant_backend, quant_kwargs, components_to_quantize, quant_mapping)
        self.quant_backend = quant_backend
        self.quant_kwargs = dict(quant_kwargs or {})
        if isinstance(components_to_quantize, str):
            components_to_quantize = [components_to_quantize]
        self.components_to_quantize = list(components_to_quantize) if components_to_quantize else None
        if isinstance(quant_mapping, dict):  # diffusers' own config objects: read as ours
            quant_mapping = {k: DiffusersAutoQuantizer.from_dict(v.to_dict())
                             if is_diffusers_config(v) else v for k, v in quant_mapping.items()}
        self.quant_mapping = quant_mapping
        self.config_mapping: dict = {}  # filled as components resolve: {name: config}
        self.is_granular = quant_mapping is not None
        self._validate()

    @classmethod
    def from_diffusers(cls, config) -> "PipelineQuantizationConfig":
        """diffusers' PipelineQuantizationConfig -> diffquant's, field for field (its config
        objects read as diffusers' config.json entries are)."""
        return cls(quant_backend=config.quant_backend, quant_kwargs=config.quant_kwargs,
                   components_to_quantize=config.components_to_quantize,
                   quant_mapping=config.quant_mapping)

    # -- validation ------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.quant_backend and self.quant_mapping:
            raise ConfigError("PipelineQuantizationConfig: give either quant_backend (global mode) or "
                              "quant_mapping (granular mode), not both")
        if not self.quant_backend and not self.quant_mapping:
            raise ConfigError("PipelineQuantizationConfig: give quant_backend (with quant_kwargs) or "
                              "a quant_mapping of component name -> config")
        if not self.quant_kwargs and not self.quant_mapping:
            raise ConfigError("PipelineQuantizationConfig: quant_backend needs quant_kwargs, e.g. "
                              "quant_kwargs={'quant_type': 'int8wo'} for torchao; or use quant_mapping")
        if self.quant_backend:
            self._validate_backend()
        if self.quant_mapping is not None:
            self._validate_mapping()

    def _validate_backend(self) -> None:
        ours = AUTO_QUANTIZATION_CONFIG_MAPPING
        backend = self.quant_backend
        if backend not in ours:
            raise ConfigError(f"PipelineQuantizationConfig: quant_backend={backend!r} is unknown; "
                              f"diffquant backends: {sorted(ours)}")
        # diffusers demands identical __init__ signatures; we only demand that every given
        # kwarg is accepted by both classes, and name the one that is not.
        cls = ours[backend]
        names, takes_any = _init_names(cls)
        bad = sorted(set(self.quant_kwargs) - names)
        if bad and not takes_any:
            raise ConfigError(f"PipelineQuantizationConfig: quant_kwargs {bad} are not accepted by "
                              f"{cls.__module__}.{cls.__name__} (takes {sorted(names)}); "
                              "use quant_mapping with a config object per component instead")
        try:  # a config taking **kwargs (TorchAoConfig's group_size) checks them itself, by name
            cls(**self.quant_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"PipelineQuantizationConfig: quant_kwargs {bad or self.quant_kwargs} "
                              f"are not accepted by {cls.__module__}.{cls.__name__}: {err}") from err
        # transformers' side is checked when a transformers component resolves (_build): the kwargs
        # are translated to its names first, so one set of kwargs serves both libraries, where
        # diffusers demands identical __init__ signatures.

    def _validate_mapping(self) -> None:
        if not isinstance(self.quant_mapping, dict):
            raise ConfigError("PipelineQuantizationConfig: quant_mapping should be a dict of "
                              "component name -> quantization config object")
        ours = tuple(set(AUTO_QUANTIZATION_CONFIG_MAPPING.values()))
        for name, config in self.quant_mapping.items():
            # transformers' registry imports torchao and more (seconds): only look when needed.
            if not isinstance(config, ours) and \
                    not isinstance(config, tuple(set(transformers_config_mapping().values()))):
                raise ConfigError(f"PipelineQuantizationConfig: quant_mapping[{name!r}] is a "
                                  f"{type(config).__name__}, which is not a quantization config of "
                                  "diffquant or transformers (e.g. TorchAoConfig, BitsAndBytesConfig)")

    # -- resolution ------------------------------------------------------------------------
    def _resolve_quant_config(self, is_diffusers: bool = True, module_name: str | None = None):
        """The config for component ``module_name``, or None to leave it unquantized."""
        if self.is_granular and module_name in self.quant_mapping:
            config = self.quant_mapping[module_name]
        elif (self.components_to_quantize and module_name in self.components_to_quantize) or \
                (not self.is_granular and not self.components_to_quantize):
            mapping = AUTO_QUANTIZATION_CONFIG_MAPPING if is_diffusers else transformers_config_mapping()
            if self.quant_backend not in mapping:
                raise ConfigError(f"component {module_name!r} is a transformers model, and transformers "
                                  f"has no {self.quant_backend!r} backend; leave it out of "
                                  "components_to_quantize or use quant_mapping")
            config = self._build(mapping[self.quant_backend], module_name, is_diffusers)
        else:
            return None
        self.config_mapping[module_name] = config
        return config

    def _build(self, cls, module_name, is_diffusers=True):
        if is_diffusers:
            try:
                return cls(**self.quant_kwargs)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"component {module_name!r}: {cls.__name__}(**{self.quant_kwargs}) "
                                  f"failed: {err}") from err
        what = (f"component {module_name!r} is a transformers model: transformers' "
                f"{cls.__name__} (backend {self.quant_backend!r})")
        todo = (f"give it a transformers config object instead, quant_mapping={{{module_name!r}: "
                f"transformers.{cls.__name__}(...), ...}}, or leave it out of components_to_quantize")
        # our kwargs, in transformers' names (diffquant's QuantoConfig weights_dtype= is its weights=;
        # a torchao scheme name becomes the torchao config object transformers 5 requires)
        try:
            kwargs = AUTO_QUANTIZATION_CONFIG_MAPPING[self.quant_backend].transformers_kwargs(
                self.quant_kwargs)
        except ConfigError as err:
            raise ConfigError(f"component {module_name!r}: {err}") from err
        # transformers' configs swallow unknown names in **kwargs: refuse one it does not name
        names, _ = _init_names(cls)
        bad = sorted(set(kwargs) - names)
        if bad:
            raise ConfigError(f"{what} does not take quant_kwargs {bad} (it takes {sorted(names)}); "
                              f"{todo}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{what} rejects quant_kwargs {kwargs}: {err}; {todo}") from err

    def requested_components(self) -> set[str]:
        """Names the caller asked for explicitly (to warn about those a pipeline lacks)."""
        return set(self.quant_mapping or {}) | set(self.components_to_quantize or ())

    def __repr__(self) -> str:
        if not self.config_mapping:
            mode = f"quant_mapping={self.quant_mapping!r}" if self.is_granular else \
                f"quant_backend={self.quant_backend!r}, quant_kwargs={self.quant_kwargs!r}, " \
                f"components_to_quantize={self.components_to_quantize!r}"
            return f"PipelineQuantizationConfig({mode})"
        lines = [f"  {name}: {config!r}" for name, config in sorted(self.config_mapping.items())]
        return "PipelineQuantizationConfig(\n" + "\n".join(lines) + "\n)"
