"""The command line's quantization SPEC: ``backend:scheme[@component,component]``.

A SPEC names a backend, one of its schemes and the pipeline components it applies to
(default: ``transformer``). Several SPECs make one granular ``PipelineQuantizationConfig``:

    >>> from diffquant.spec import parse_spec
    >>> parse_spec("bnb:nf4@transformer,text_encoder_2")
    QuantSpec(text='bnb:nf4@transformer,text_encoder_2', backend='bitsandbytes', scheme='nf4', components=('transformer', 'text_encoder_2'))

Components that are transformers models (the text encoders) get the transformers config class
of the same backend, because transformers loads them. Each backend's config class lists its
schemes (``cli_schemes``: name -> constructor kwargs); nothing here names a backend's schemes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_COMPONENTS = ("transformer",)
ALIASES = {"bnb": "bitsandbytes"}


@dataclass(frozen=True)
class QuantSpec:
    text: str
    backend: str  # canonical family name: torchao, bitsandbytes, quanto, gguf, modelopt
    scheme: str  # lower case CLI name: int8wo, nf4, q4_0, int8
    components: tuple[str, ...]


def available_backends() -> list[str]:
    """Backend families registered in this install ("bitsandbytes_4bit" -> "bitsandbytes")."""
    from .quantizers import AUTO_QUANTIZATION_CONFIG_MAPPING

    return sorted({key.split("_")[0] for key in AUTO_QUANTIZATION_CONFIG_MAPPING})


def config_class(backend: str):
    """diffquant's config class of ``backend`` (a family name)."""
    from .quantizers import AUTO_QUANTIZATION_CONFIG_MAPPING

    for key, cls in AUTO_QUANTIZATION_CONFIG_MAPPING.items():
        if key.split("_")[0] == backend:
            return cls
    raise ConfigError(f"backend {backend!r} is not available in this install; "
                      f"use one of {', '.join(available_backends()) or '(none registered)'}")


def backend_schemes(backend: str) -> list[str]:
    """The CLI scheme names of ``backend``, as its config class lists them."""
    return list(config_class(backend).cli_schemes())


def grammar_help() -> str:
    """``torchao (int8wo, ...), bitsandbytes|bnb (nf4, ...), ...`` for error messages and --help."""
    parts = []
    for backend in available_backends():
        alias = "".join(f"/{a}" for a, b in ALIASES.items() if b == backend and a != backend)
        parts.append(f"{backend}{alias} ({', '.join(backend_schemes(backend))})")
    return ", ".join(parts) or "(no backend registered)"


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"bad --quantize SPEC {text!r}: {why}; write BACKEND:SCHEME[@COMPONENT,...] "
                       f"with BACKEND (SCHEMES) one of {grammar_help()}")


def parse_spec(text: str) -> QuantSpec:
    """Parse ``backend:scheme[@comp1,comp2]``; errors name the SPEC and list what is accepted."""
    head, at, comps = text.strip().partition("@")
    backend, colon, scheme = head.partition(":")
    backend, scheme = ALIASES.get(backend.strip().lower(), backend.strip().lower()), scheme.strip().lower()
    if not colon or not backend or not scheme:
        raise _bad(text, "missing BACKEND or SCHEME")
    if backend not in available_backends():
        raise _bad(text, f"unknown backend {backend!r}")
    scheme = config_class(backend).cli_aliases.get(scheme, scheme)
    schemes = backend_schemes(backend)
    if scheme not in schemes:
        raise _bad(text, f"unknown {backend} scheme {scheme!r}")
    components = tuple(c.strip() for c in comps.split(",")) if at else DEFAULT_COMPONENTS
    if not all(components) or len(set(components)) != len(components):
        raise _bad(text, "empty or repeated component after '@'")
    return QuantSpec(text, backend, scheme, components)


def _kwargs(spec: QuantSpec) -> dict:
    """Constructor kwargs of diffquant's config class for ``spec``."""
    return dict(config_class(spec.backend).cli_schemes()[spec.scheme])


def diffquant_config(spec: QuantSpec):
    """diffquant's config object for ``spec`` (for diffquant models such as the transformer)."""
    cls, kwargs = config_class(spec.backend), _kwargs(spec)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--quantize {spec.text!r}: {cls.__name__}(**{kwargs}) refused it ({err}); "
                          f"pick another scheme of {spec.backend}: {', '.join(backend_schemes(spec.backend))}") \
            from err


def transformers_config(spec: QuantSpec, component: str):
    """transformers' config object for ``spec`` on a transformers model (a text encoder), built
    from the same kwargs in transformers' names (the backend's ``transformers_kwargs``)."""
    from .quantizers.auto import registry_key
    from .quantizers.pipeline_config import transformers_config_mapping

    ours = config_class(spec.backend)
    cls = transformers_config_mapping().get(registry_key(diffquant_config(spec))) \
        if ours.in_transformers else None
    why = "transformers has no backend that quantizes it this way"
    if cls is not None:
        try:
            return cls(**ours.transformers_kwargs(_kwargs(spec)))
        except (TypeError, ValueError, KeyError, ImportError) as err:
            why = f"transformers' {cls.__name__} refused it ({err})"
    raise ConfigError(f"--quantize {spec.text!r}: component {component!r} is a transformers model and "
                      f"{why}; quantize {component} with bnb:nf4, quanto:int8 or torchao:int8wo, "
                      "or leave it out of the SPEC")


def _is_model(entry) -> bool:
    cls = str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else ""
    return bool(cls) and not cls.endswith(("Scheduler", "Tokenizer", "TokenizerFast", "Processor"))


def build_quantization_config(specs: list[QuantSpec], model_index: dict | None = None):
    """One granular PipelineQuantizationConfig from several SPECs.

    ``model_index`` (the pipeline's model_index.json) says which components exist and which
    library loads each; without it every component is taken to be a diffquant model.

    Example:
        >>> pq = build_quantization_config([parse_spec("torchao:int8wo")])   # doctest: +SKIP
        >>> sorted(pq.quant_mapping)                                          # doctest: +SKIP
        ['transformer']
    """
    from .quantizers.pipeline_config import PipelineQuantizationConfig

    mapping, owner = {}, {}
    for spec in specs:
        for comp in spec.components:
            if comp in owner:
                raise ConfigError(f"component {comp!r} is named by two SPECs ({owner[comp]!r} and "
                                  f"{spec.text!r}); give each component one SPEC")
            owner[comp] = spec.text
            mapping[comp] = _config_for(spec, comp, model_index)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _config_for(spec: QuantSpec, comp: str, model_index: dict | None):
    if model_index is None:
        return diffquant_config(spec)
    models = sorted(k for k, v in model_index.items() if not k.startswith("_") and _is_model(v))
    entry = model_index.get(comp)
    if comp.startswith("_") or entry is None or not _is_model(entry):
        what = "not a model" if entry is not None else "not in this pipeline"
        raise ConfigError(f"--quantize {spec.text!r}: component {comp!r} is {what}; "
                          f"name one of {', '.join(models)}")
    if str(entry[0]) == "transformers":
        return transformers_config(spec, comp)
    return diffquant_config(spec)
