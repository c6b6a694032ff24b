"""Which schemes the bench measures, their formats' ideal bits per weight, diffusers' equivalents.

Schemes come from the registry: every config class in
``diffquant.quantizers.AUTO_QUANTIZATION_CONFIG_MAPPING`` and each of its ``cpu_examples()`` (plus
``BENCH_EXTRAS``), so a new backend or example appears in the tables without touching the bench. A scheme is named by
``(config class name, example index)``, which a child process resolves the same way.

Example:
    >>> from bench.schemes import enumerate_schemes
    >>> [s.label for s in enumerate_schemes()][:1]                     # doctest: +SKIP
    ['torchao int8wo']
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scheme:
    """One row of the tables. ``cls_name``/``index`` locate its config; None = unquantized."""

    label: str
    backend: str                    # "bf16", "float32" or a registry key's quant_method
    cls_name: str | None = None
    index: int | None = None
    dtype: str = "bfloat16"         # torch_dtype passed to from_pretrained

    @property
    def quantized(self) -> bool:
        return self.cls_name is not None


BASELINES = (Scheme("bf16 (unquantized)", "bf16", dtype="bfloat16"),
             Scheme("float32 (unquantized)", "float32", dtype="float32"))


def config_classes() -> dict[str, type]:
    """Registered config classes by name, each once (bitsandbytes registers two keys)."""
    from diffquant.quantizers import AUTO_QUANTIZATION_CONFIG_MAPPING

    out = {}
    for cls in AUTO_QUANTIZATION_CONFIG_MAPPING.values():
        out.setdefault(cls.__name__, cls)
    return out


def examples_of(cls) -> list:
    """``cls.cpu_examples()`` and then the bench's extra schemes for it (BENCH_EXTRAS)."""
    return cls.cpu_examples() + [cls(**kwargs) for kwargs in BENCH_EXTRAS.get(cls.__name__, ())]


# Schemes measured here but not cpu examples: the tests' toy layers are narrower than a K-quant
# super-block (256), so a K-quant example would fall back to BF16 there.
BENCH_EXTRAS = {"GGUFQuantizationConfig": [dict(compute_dtype=torch.bfloat16, quant_type="Q4_K")]}


def config_of(scheme: Scheme):
    """The diffquant config object of ``scheme`` (a fresh one: configs may be mutated on load)."""
    return examples_of(config_classes()[scheme.cls_name])[scheme.index]


def _label(config) -> str:
    from diffquant.quantizers import DiffusersAutoQuantizer

    try:
        return DiffusersAutoQuantizer.from_config(config, pre_quantized=False).scheme_name()
    except Exception:  # noqa: BLE001 - a label must never stop the bench
        return f"{config.quant_method} {getattr(config, 'quant_type', '')}".strip()


def enumerate_schemes(pattern: str | None = None) -> list[Scheme]:
    """The baselines, then every registered cpu example (optionally filtered by substring)."""
    schemes = list(BASELINES)
    seen: dict[str, int] = {}
    for name, cls in config_classes().items():
        for i, config in enumerate(examples_of(cls)):
            label = _label(config)
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label} #{seen[label]}"
            schemes.append(Scheme(label, str(config.quant_method), name, i))
    if pattern:
        schemes = [s for s in schemes if not s.quantized or pattern.lower() in s.label.lower()]
    return schemes


# -- ideal bits per weight -------------------------------------------------------------------
def ideal_bits(config, in_features: int) -> tuple[float | None, str]:
    """(bits per weight, formula) that the format itself needs for a row of ``in_features``.

    "Ideal" is the format's definition (payload + its scales/zero points per block or row), not
    an implementation: it is what a measured layout should approach.
    """
    method = str(getattr(config, "quant_method", ""))
    row = f"16/{in_features}"
    if method == "gguf":
        from diffquant.ops.formats.gguf import BLOCK_LAYOUT, ggml_type

        block, size = BLOCK_LAYOUT[ggml_type(config.quant_type)]
        if in_features % block:  # such rows stay in the checkpoint's float type
            return 16.0, f"16 (rows of {in_features} do not fit {block}-blocks)"
        return 8 * size / block, f"8*{size}/{block}"
    if method == "bitsandbytes":
        if config.load_in_8bit:       # int8 rows + one fp32 absmax per row
            return 8 + 32 / in_features, f"8 + 32/{in_features}"
        if config.bnb_4bit_use_double_quant:  # fp32 absmax per 256 absmax (int8) per 64 weights
            return 4 + 8 / 64 + 32 / (64 * 256), "4 + 8/64 + 32/(64*256)"
        return 4 + 32 / 64, "4 + 32/64"
    if method == "torchao":
        kind, params = config.scheme()
        if kind == "int4wo":          # bf16 scale + bf16 zero point per group
            g = params["group_size"]
            return 4 + 32 / g, f"4 + 32/{g}"
        return 8 + 16 / in_features, f"8 + {row}"  # one bf16 scale per output row
    if method == "quanto":
        weights = str(getattr(config, "weights_dtype", ""))
        for bits in (4, 2):  # int4 / int2: a 16-bit scale and shift per group of 128
            if weights.endswith(str(bits)) and "float" not in weights:
                return bits + 32 / 128, f"{bits} + 32/128"
        return 8 + 16 / in_features, f"8 + {row}"
    if method == "modelopt":
        return _modelopt_bits(config, in_features)
    return None, "?"


def _modelopt_bits(config, in_features: int) -> tuple[float | None, str]:
    qt = str(config.quant_type).upper()
    block = getattr(config, "block_quantize", None)
    scale_block = getattr(config, "scale_block_quantize", None)
    if qt == "FP8":                   # one fp32 scale per tensor
        return 8.0, "8 (+ one scale per tensor)"
    if qt == "INT8":
        return 8 + 32 / in_features, f"8 + 32/{in_features}"
    if qt == "NVFP4":                 # e2m1 + an fp8 scale per 16
        b = block or 16
        return 4 + 8 / b, f"4 + 8/{b}"
    if block and scale_block:         # scales quantized to 8 bits, fp32 per scale block
        return 4 + 8 / block + 32 / (block * scale_block), \
            f"4 + 8/{block} + 32/({block}*{scale_block})"
    if block:                         # a 16-bit scale per block, as modelopt exports INT4
        return 4 + 16 / block, f"4 + 16/{block}"
    return None, "?"


# Formats diffquant reads but cannot write: listed in table 1 with their ideal bits.
LOAD_ONLY_GGUF = ("Q3_K", "Q2_K")


# -- diffusers' equivalent -------------------------------------------------------------------
class NotAvailable(Exception):
    """diffusers cannot run this scheme here; the message goes into the table cell."""


def diffusers_gap(config) -> str | None:
    """Why diffusers cannot run ``config`` on this machine (cheap, no imports), or None."""
    method = str(config.quant_method)
    if method == "bitsandbytes" and not torch.cuda.is_available():
        return "n/a (diffusers needs a GPU)"
    if method not in ("bitsandbytes", "torchao", "quanto", "gguf", "modelopt"):
        return f"n/a (no diffusers backend for {method})"
    return None


def _filtered(cls, fields: dict) -> dict:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in fields.items() if k in accepted}


def diffusers_config(config):
    """diffusers' config object equivalent to diffquant's ``config`` (imported lazily)."""
    import diffusers

    gap = diffusers_gap(config)
    if gap:
        raise NotAvailable(gap)
    method = str(config.quant_method)
    if method == "torchao":
        return diffusers.TorchAoConfig(_torchao_object(config),
                                       modules_to_not_convert=config.modules_to_not_convert)
    if method == "gguf":
        return diffusers.GGUFQuantizationConfig(compute_dtype=config.compute_dtype)
    if method == "bitsandbytes":
        d = config.to_dict()
        d.update(load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit)
        return diffusers.BitsAndBytesConfig(**_filtered(diffusers.BitsAndBytesConfig, d))
    if method == "quanto":
        return diffusers.QuantoConfig(**_filtered(diffusers.QuantoConfig, config.to_dict()))
    # diffusers builds modelopt's quant_cfg from the fields itself; diffquant's JSON copy of it
    # (string block-size keys) would not validate there.
    d = {k: v for k, v in config.to_dict().items() if k not in ("quant_method", "modelopt_config")}
    return diffusers.NVIDIAModelOptConfig(**_filtered(diffusers.NVIDIAModelOptConfig, d))


def _torchao_object(config):
    """diffusers 0.42 takes only torchao AOBaseConfig objects: build the one diffquant's names."""
    if not isinstance(config.quant_type, str):
        return config.quant_type
    import torchao.quantization as tq

    kind, params = config.scheme()
    if kind == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if kind == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if kind == "int4wo":
        return tq.Int4WeightOnlyConfig(group_size=params["group_size"])
    if kind == "float8wo":
        return tq.Float8WeightOnlyConfig(weight_dtype=params.get("weight_dtype", torch.float8_e4m3fn))
    raise NotAvailable(f"n/a (no torchao config for {kind})")
