"""torchao backend: TorchAoConfig and the quantizer; its plain-buffer int8 / int4 / float8 linear
layers are in ``torchao_layers``.

The layers hold plain tensors (``weight`` int8/uint8/float8, ``weight_scale``, ``weight_zero``)
and reproduce torchao's numerics with ``diffquant.ops.formats.torchao``, so running a model needs no
torchao. torchao is needed for ``AOBaseConfig`` objects, for a config's JSON and for the files,
which ``torchao_format`` converts at the file boundary:

- int8wo, int8dq and float8wo are saved as diffusers 0.42 saves them (so diffusers loads them):
  config.json's ``quant_type`` is ``{"default": <torchao config>}`` and the safetensors hold
  torchao's flattened layout (``<layer>._weight_qdata``, ``_weight_scale``, ``_weight_zero_point``
  plus per-tensor JSON in the file's metadata); without torchao installed they fall back to
  diffusers 0.37's scheme name and plain keys (``<layer>.weight``, ``weight_scale``);
- int4wo keeps that 0.37 form: torchao 0.18's int4 tensors run only with the mslk package or
  on CUDA, XPU and NPU, so no int4 file diffusers writes or reads works on a CPU;
- ``.bin`` files holding torchao tensor subclasses (``Int8Tensor``, ``Float8Tensor``), read with
  ``torch.load(weights_only=True)``: importing torchao registers its classes as safe globals.

int4 deviates from torchao's default on purpose: ``Int4WeightOnlyConfig()`` packs for the
``mslk`` package (not published for CPUs) or CUDA's tinygemm tile layout. diffquant stores the
same tinygemm numbers (uint4 pairs in uint8 + bf16 scale/zero per group) and dequantizes then
multiplies: it runs on any device, and the state dict does not depend on the device it was made on
(``torch.ops.aten._weight_int4pack_mm_for_cpu`` would need a CPU-only packed layout).

Example:
    >>> import torch
    >>> from diffquant import TorchAoConfig
    >>> TorchAoConfig("int4wo", group_size=64).to_dict()["quant_type_kwargs"]
    {'group_size': 64}
"""

from __future__ import annotations

import json
import logging

import torch

from ..errors import CheckpointError, ConfigError, QuantizationError
from .auto import register_quantizer
from .base import DiffusersQuantizer, owner_of, require
from .config import QuantizationConfigMixin, QuantizationMethod, check_field
from .torchao_format import TORCHAO_TENSOR, flatten, torchao_pieces
from .torchao_layers import LAYERS, TorchAoLinear

logger = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# name -> (kind, fixed params). Names and their meanings follow diffusers 0.37's TorchAoConfig
# ("float8wo" is e5m2 there, "float8_weight_only" e4m3 as in torchao).
SCHEMES = {
    "int8wo": ("int8wo", {}), "int8_weight_only": ("int8wo", {}),
    "int8dq": ("int8dq", {}), "int8_dynamic_activation_int8_weight": ("int8dq", {}),
    "int4wo": ("int4wo", {}), "int4_weight_only": ("int4wo", {}),
    "float8wo": ("float8wo", {"weight_dtype": E5M2}), "float8wo_e5m2": ("float8wo", {"weight_dtype": E5M2}),
    "float8wo_e4m3": ("float8wo", {"weight_dtype": E4M3}),
    "float8_weight_only": ("float8wo", {"weight_dtype": E4M3}),
}
KWARGS = {"int8wo": {"set_inductor_config"}, "int8dq": {"set_inductor_config"},
          "int4wo": {"group_size", "set_inductor_config"},
          "float8wo": {"weight_dtype", "set_inductor_config"}}
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Names diffusers 0.37 accepted that diffquant does not run: float8 activations need fp8 matmuls
# (CUDA sm89+), the sub-byte formats need torchao's own kernels.
NOT_RUNNABLE = ({"int4dq", "int8_dynamic_activation_int4_weight", "float8dq", "float8dq_e4m3",
                 "float8_dynamic_activation_float8_weight", "float8_static_activation_float8_weight",
                 "float8dq_e4m3_tensor", "float8dq_e4m3_row", "uintx_weight_only"}
                | {f"uint{b}wo" for b in range(1, 8)}
                | {f"fp{b}" for b in range(3, 8)}
                | {f"fp{b}_e{e}m{b - e - 1}" for b in range(3, 8) for e in range(1, b)})


def _fp8_dtype(value, field="weight_dtype"):
    dtype = getattr(torch, str(value).replace("torch.", ""), None) if isinstance(value, str) else value
    if dtype not in (E4M3, E5M2):
        raise ConfigError(f"TorchAoConfig.quant_type_kwargs[{field!r}]={value!r}: expected "
                          "'float8_e4m3fn' or 'float8_e5m2'")
    return dtype


class TorchAoConfig(QuantizationConfigMixin):
    """torchao quantization: a scheme name (diffusers 0.37's strings) or a torchao AOBaseConfig.

    A name is shorthand for its torchao config: the JSON (and so config.json) is diffusers 0.42's
    form, and a name equals the config object it stands for. int4wo keeps 0.37's JSON (see the
    module docstring).

    Example:
        >>> from diffquant import TorchAoConfig
        >>> TorchAoConfig("int8wo").to_dict()["quant_type"]["default"]["_type"]  # diffusers 0.42's
        'Int8WeightOnlyConfig'
        >>> sorted(TorchAoConfig("int4wo", group_size=64).to_dict().items())  # diffusers 0.37's
        [('modules_to_not_convert', None), ('quant_method', 'torchao'), ('quant_type', 'int4wo'), \
('quant_type_kwargs', {'group_size': 64})]
        >>> TorchAoConfig("int8wo", group_size=32)
        Traceback (most recent call last):
        ...
        diffquant.errors.ConfigError: TorchAoConfig('int8wo'): unknown keyword argument(s) ['group_size']; ...
    """

    _method_value = ("torchao",)

    def __init__(self, quant_type, modules_to_not_convert=None, **kwargs):
        self.quant_method = QuantizationMethod.TORCHAO
        self.quant_type = quant_type
        self.modules_to_not_convert = self._check_modules_list(modules_to_not_convert)
        if isinstance(quant_type, (bool, int, float, list, dict, type(None))):
            raise ConfigError(f"TorchAoConfig.quant_type={quant_type!r}: expected a name such as "
                              "'int8wo' or a torchao AOBaseConfig object")
        if isinstance(quant_type, str):
            # a dict read from config.json carries the kwargs under "quant_type_kwargs"
            nested = kwargs.pop("quant_type_kwargs", None) or {}
            if not isinstance(nested, dict):
                raise ConfigError(f"TorchAoConfig.quant_type_kwargs={nested!r}: expected an object")
            kwargs = dict(nested, **kwargs)
            check_field("TorchAoConfig", "quant_type_kwargs['group_size']",
                        kwargs.get("group_size"), "int", optional=True)
            check_field("TorchAoConfig", "quant_type_kwargs['set_inductor_config']",
                        kwargs.get("set_inductor_config"), "bool", optional=True)
            if "weight_dtype" in kwargs:  # JSON holds names, not dtypes
                kwargs["weight_dtype"] = str(_fp8_dtype(kwargs["weight_dtype"])).split(".")[-1]
            self.quant_type_kwargs = kwargs
        elif kwargs:
            raise ConfigError(f"TorchAoConfig: keyword arguments {sorted(kwargs)} only apply to a "
                              "string quant_type; set them on the torchao config object instead")
        self.scheme()  # validate now, as diffusers does

    @property
    def bits(self) -> int:
        return 4 if self.scheme()[0] == "int4wo" else 8

    def scheme(self) -> tuple[str, dict]:
        """(kind, params): kind in int8wo / int8dq / int4wo / float8wo; raises if not runnable."""
        if not isinstance(self.quant_type, str):
            return _scheme_of_object(self.quant_type)
        name = self.quant_type
        if name in NOT_RUNNABLE:
            raise QuantizationError(f"TorchAoConfig: quant_type {name!r} cannot run with diffquant's "
                                    f"torchao backend; runnable quant types: {sorted(SCHEMES)}")
        if name not in SCHEMES:
            raise ConfigError(f"TorchAoConfig: unknown quant_type {name!r}; expected one of "
                              f"{sorted(SCHEMES)} or a torchao AOBaseConfig object")
        kind, params = SCHEMES[name]
        bad = sorted(set(self.quant_type_kwargs) - KWARGS[kind])
        if bad:
            raise ConfigError(f"TorchAoConfig({name!r}): unknown keyword argument(s) {bad}; "
                              f"accepted: {sorted(KWARGS[kind])}")
        params = dict(params)
        if kind == "int4wo":
            params["group_size"] = self.quant_type_kwargs.get("group_size", 128)
            if params["group_size"] not in INT4_GROUP_SIZES:
                raise ConfigError(f"TorchAoConfig({name!r}): group_size={params['group_size']!r}; "
                                  f"expected one of {INT4_GROUP_SIZES}")
        if kind == "float8wo" and "weight_dtype" in self.quant_type_kwargs:
            params["weight_dtype"] = _fp8_dtype(self.quant_type_kwargs["weight_dtype"])
        return kind, params

    def to_dict(self) -> dict:
        """diffusers' JSON: 0.42's ``{"default": config_to_dict(obj)}`` where ``as_torchao_config``
        gives an object, else 0.37's string form."""
        d = {"quant_method": "torchao", "quant_type": self.quant_type,
             "modules_to_not_convert": self.modules_to_not_convert}
        obj = self.as_torchao_config()
        if obj is None:
            d["quant_type_kwargs"] = dict(self.quant_type_kwargs)
        else:
            from torchao.core.config import config_to_dict

            d["quant_type"] = {"default": config_to_dict(obj)}
        return json.loads(json.dumps(d))  # a deep, JSON-clean copy

    def as_torchao_config(self):
        """The torchao AOBaseConfig this config saves as (diffusers 0.42's form), or None where it
        keeps 0.37's scheme name: int4wo names, and any name when torchao is not installed.

        Example:
            >>> TorchAoConfig("float8wo").as_torchao_config().weight_dtype
            torch.float8_e5m2
        """
        if not isinstance(self.quant_type, str):
            return self.quant_type
        kind, params = self.scheme()
        if kind == "int4wo":
            return None
        try:
            import torchao.quantization  # noqa: F401  (seconds: only when a JSON is wanted)
        except ImportError:
            return None
        inductor = {k: v for k, v in self.quant_type_kwargs.items() if k == "set_inductor_config"}
        return _torchao_config(kind, {**params, **inductor})

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        data = {**config_dict, **kwargs}
        method = data.pop("quant_method", "torchao")
        if getattr(method, "value", method) != "torchao":
            raise ConfigError(f"TorchAoConfig.from_dict: quant_method={config_dict['quant_method']!r},"
                              " expected 'torchao'")
        if "quant_type" not in data:
            raise ConfigError("TorchAoConfig.from_dict: missing key 'quant_type'")
        quant_type = data.pop("quant_type")
        if isinstance(quant_type, dict):
            if set(quant_type) != {"default"}:
                raise ConfigError(f"TorchAoConfig.from_dict: quant_type should be a name or "
                                  f"{{'default': <torchao config>}}, got keys {sorted(quant_type)}")
            config_from_dict = require("torchao.core.config", "torchao").config_from_dict
            try:
                quant_type = config_from_dict(quant_type["default"])
            except (TypeError, ValueError, KeyError, AttributeError) as err:
                raise ConfigError(f"TorchAoConfig.quant_type['default']: not a torchao config "
                                  f"torchao can read ({type(err).__name__}: {err})") from None
        obj = cls(quant_type, **data)
        return (obj, {}) if return_unused_kwargs else obj

    @classmethod
    def transformers_kwargs(cls, quant_kwargs: dict) -> dict:
        """transformers 5 takes only torchao config objects: turn a scheme name into its object."""
        out = dict(quant_kwargs)
        if not isinstance(out.get("quant_type"), str):
            return out
        ours = cls(**quant_kwargs)
        kind, params = ours.scheme()
        if kind == "int4wo":
            _require_torchao_int4_kernels()
        return {"quant_type": _torchao_config(kind, params),
                "modules_to_not_convert": ours.modules_to_not_convert}

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        """The short names (diffusers' long aliases, "int8_weight_only", are not listed)."""
        return {n: {"quant_type": n} for n in SCHEMES
                if "_only" not in n and "_activation" not in n}

    @classmethod
    def cpu_examples(cls) -> list["TorchAoConfig"]:
        return [cls("int8wo"), cls("int8dq"), cls("int4wo", group_size=64), cls("float8wo_e4m3")]


def _torchao_config(kind: str, kwargs: dict):
    """torchao's config object for scheme ``kind`` (``scheme()``'s params, set_inductor_config)."""
    import torchao.quantization as tq

    make = {"int8wo": tq.Int8WeightOnlyConfig, "int8dq": tq.Int8DynamicActivationInt8WeightConfig,
            "int4wo": tq.Int4WeightOnlyConfig, "float8wo": tq.Float8WeightOnlyConfig}[kind]
    return make(**kwargs)


def _require_torchao_int4_kernels() -> None:
    """transformers quantizes its models (the text encoders) with torchao itself, and torchao's
    Int4WeightOnlyConfig packs with the mslk package (torchao 0.18 has no CPU int4 of its own:
    its other packings are CUDA's or refuse the CPU). Without mslk every such load failed deep in
    transformers' weight conversion; say so before loading."""
    import importlib.util

    if importlib.util.find_spec("mslk") is None:
        raise ConfigError("torchao int4wo on a transformers model (a text encoder): transformers "
                          "quantizes it with torchao's Int4WeightOnlyConfig, whose packing needs "
                          "the mslk package, which is not installed (torchao has no CPU int4 for "
                          "it). Quantize text encoders with torchao int8wo, bitsandbytes nf4 or "
                          "quanto int4, or give transformers a torchao config object of your own "
                          "(on CUDA: Int4WeightOnlyConfig("
                          "int4_packing_format='tile_packed_to_4d'))")


def _scheme_of_object(cfg) -> tuple[str, dict]:
    """Map a torchao AOBaseConfig to the scheme diffquant runs for it, or explain why not."""
    name = type(cfg).__name__

    def refuse(why):
        raise QuantizationError(f"TorchAoConfig({name}): {why}; diffquant runs Int8WeightOnlyConfig"
                                "(PerRow), Int8DynamicActivationInt8WeightConfig(PerRow, symmetric),"
                                " Int4WeightOnlyConfig(group_size, tinygemm) and "
                                "Float8WeightOnlyConfig(PerRow)")

    per_row = lambda g: type(g).__name__ == "PerRow" and getattr(g, "dim", -1) in (-1, 1)  # noqa: E731
    if name == "Int8WeightOnlyConfig":
        return ("int8wo", {}) if per_row(cfg.granularity) else refuse("only PerRow granularity")
    if name == "Int8DynamicActivationInt8WeightConfig":
        gran = cfg.granularity if isinstance(cfg.granularity, (list, tuple)) else [cfg.granularity]
        if not all(g is None or per_row(g) for g in gran) or str(cfg.act_mapping_type.name) != "SYMMETRIC" \
                or cfg.reduce_range:
            refuse("only PerRow granularity, symmetric activations, reduce_range=False")
        return "int8dq", {}
    if name == "Int4WeightOnlyConfig":
        if str(getattr(cfg.int4_choose_qparams_algorithm, "value", "tinygemm")) != "tinygemm" \
                or cfg.group_size not in INT4_GROUP_SIZES:
            refuse(f"only the tinygemm algorithm with group_size in {INT4_GROUP_SIZES}")
        return "int4wo", {"group_size": cfg.group_size}
    if name == "Float8WeightOnlyConfig":
        if not per_row(cfg.granularity) or cfg.weight_dtype not in (E4M3, E5M2):
            refuse("only PerRow granularity with float8_e4m3fn or float8_e5m2")
        return "float8wo", {"weight_dtype": cfg.weight_dtype}
    refuse("this torchao config is not implemented")


@register_quantizer("torchao", TorchAoConfig)
class TorchAoQuantizer(DiffusersQuantizer):
    """Swaps nn.Linear for plain-buffer torchao layers; reads and writes diffusers' torchao files."""

    default_torch_dtype = torch.bfloat16

    def __init__(self, quantization_config, pre_quantized: bool = True, **kwargs):
        super().__init__(quantization_config, pre_quantized=pre_quantized, **kwargs)
        self.kind, self.params = quantization_config.scheme()
        self._file_meta: dict | None = None
        self._file = "checkpoint"

    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        if self.pre_quantized:
            # torchao registers its tensor classes as torch.load safe globals when imported, which
            # a .bin written by diffusers needs; its absence only matters for such files.
            try:
                import torchao  # noqa: F401
            except ImportError:
                pass

    def make_layer(self, name, module):
        if self.kind == "int4wo" and module.in_features % self.params["group_size"]:
            logger.info("torchao int4: %s has in_features=%d, not a multiple of group_size=%d; left "
                        "unquantized (as torchao does)", name, module.in_features,
                        self.params["group_size"])
            return module
        # the compute dtype is known once the weight (or its scales) arrive, in load_piece
        return LAYERS[self.kind](module.in_features, module.out_features, module.bias is not None,
                                 **self.params)

    def check_if_quantized_param(self, model, key, checkpoint=None) -> bool:
        if self._file_meta is None and checkpoint is not None:
            self._file_meta = checkpoint.metadata if "tensor_names" in checkpoint.metadata else {}
        if checkpoint is not None:
            self._file = checkpoint.file_of(key)  # for error messages
        return super().check_if_quantized_param(model, key, checkpoint)

    def create_quantized_param(self, model, key, tensor, dtype, device) -> None:
        module, rel = owner_of(model, key)
        if not self.pre_quantized:
            return super().create_quantized_param(model, key, tensor, dtype, device)
        self._check_stored_type(key, rel)
        for piece, value in torchao_pieces(rel, tensor, self.kind, f"{self._file}: {key}"):
            value = value.to(device) if device is not None else value
            module.load_piece(piece, value, pre_quantized=True, dtype=dtype, device=device)

    def _check_stored_type(self, key: str, rel: str) -> None:
        """A flattened torchao file names each weight's tensor class; it must match the config."""
        if not self._file_meta or not rel.startswith("_weight_"):
            return
        weight_key = key.rpartition(".")[0] + ".weight"
        info = json.loads(self._file_meta.get(weight_key, "{}"))
        if info.get("_type") != TORCHAO_TENSOR.get(self.kind):
            raise CheckpointError(f"{self._file}: {key}: torchao saved this weight as "
                                  f"{info.get('_type')!r}, but "
                                  f"the quantization_config asks for {self.kind}; diffquant reads "
                                  "Int8Tensor (int8wo/int8dq) and Float8Tensor (float8wo) files")

    def get_state_dict_and_metadata(self, model, state_dict: dict) -> tuple[dict, dict]:
        """What ``save_pretrained`` writes: the 0.42 form where config.json gets a torchao object
        (torchao's flattened tensors and their metadata), else the plain buffers."""
        if self.kind not in TORCHAO_TENSOR:  # int4wo: diffquant's own keys
            return state_dict, {}
        config = self.quantization_config.as_torchao_config()
        if config is None:
            logger.warning("torchao is not installed: saving torchao %s in diffusers 0.37's form "
                           "(scheme name, plain keys), which diffusers 0.42 cannot load; pip "
                           "install 'diffquant[torchao]' to save diffusers 0.42's form", self.kind)
            return state_dict, {}
        layers = {n: m for n, m in model.named_modules() if isinstance(m, TorchAoLinear)}
        return flatten(layers, state_dict, config)

    def scheme_name(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"torchao {self.kind}" + (f" ({extra})" if extra else "")
