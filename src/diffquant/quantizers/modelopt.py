"""NVIDIA ModelOpt backend: NVIDIAModelOptConfig, ModelOptLinear, NVIDIAModelOptQuantizer.

Weight-only FP8, INT8, INT4, NF4 and NVFP4, stored exactly as modelopt's ``mtq.compress``
leaves a linear layer: ``<layer>.weight`` (packed data) and ``<layer>.weight_quantizer._amax`` /
``._scale`` / ``._double_scale`` / ``._scale_zeros``. Quantizing uses modelopt's own
TensorQuantizer (bit-identical to ``mtq.quantize`` + ``mtq.compress``); dequantizing is plain torch
(``ops/formats/modelopt.py``), so a saved checkpoint runs anywhere, without modelopt's kernels.

Which layers are quantized, and how, is read from ``modelopt_config["quant_cfg"]`` the way
modelopt reads it (patterns over ``<layer>.weight_quantizer``), so modelopt's default exclusions
(``*proj_out.*``, ``*lm_head*``, ...) apply as they do in diffusers.

Example:
    >>> import torch
    >>> from diffquant import NVIDIAModelOptConfig
    >>> cfg = NVIDIAModelOptConfig(quant_type="FP8")
    >>> model = MyModel.from_pretrained("dir", quantization_config=cfg,       # doctest: +SKIP
    ...                                 torch_dtype=torch.bfloat16)
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, QuantizationError
from ..ops.cpu import int8 as ci8
from ..ops.cpu import linear as fl
from ..ops.cpu.dispatch import ROUTES
from ..ops.formats import modelopt as mm
from ..ops.formats.modelopt import CPU_SCHEMES, SCHEME_PIECES, scheme_of  # noqa: F401 (re-exported)
# how modelopt reads its quant_cfg; re-exported, the tests import them from here
from ..ops.formats.modelopt import canonical as _canonical
from ..ops.formats.modelopt import resolve_quantizer  # noqa: F401
from .auto import register_quantizer
from .base import DiffusersQuantizer, QuantizedLinear, owner_of, require
from .config import QuantizationConfigMixin, QuantizationMethod, check_field

logger = logging.getLogger(__name__)

QUANT_TYPE_BITS = {"FP8": [4, 3], "INT8": 8, "INT4": 4, "NF4": 4, "NVFP4": [2, 1]}
QUANT_TYPE_SCALE_BITS = {"NF4": 8, "NVFP4": [4, 3]}


def _jsonable(value):
    """Int dict keys -> strings (JSON's only key type; diffusers' sort_keys dump needs it too)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _default_disabled_cfg() -> dict:
    """modelopt's default exclusions in the flat (legacy) dict form diffusers writes."""
    mtq = require("modelopt.torch.quantization", "modelopt")
    raw = mtq.config._default_disabled_quantizer_cfg
    if isinstance(raw, dict):  # modelopt < 0.4x already uses the flat form
        return copy.deepcopy(raw)
    out = {}  # modelopt >= 0.4x: a list of {"quantizer_name", "parent_class"?, "enable"}
    for entry in raw:
        entry = dict(entry)
        body = {"enable": entry.get("enable", True)}
        if entry.get("parent_class"):
            out[entry["parent_class"]] = {entry["quantizer_name"]: body}
        else:
            out[entry["quantizer_name"]] = body
    return out


class NVIDIAModelOptConfig(QuantizationConfigMixin):
    """Config of the modelopt backend; fields and ``modelopt_config`` follow diffusers 0.42.

    ``quant_type`` is ``"<weight>"`` or ``"<weight>_<activation>"`` with each one of FP8, INT8,
    INT4, NF4, NVFP4. INT4/NF4/NVFP4 need ``channel_quantize=-1`` and ``block_quantize``; NF4 and
    NVFP4 also ``scale_channel_quantize=-1`` and ``scale_block_quantize``.

    Example:
        >>> from diffquant import NVIDIAModelOptConfig
        >>> c = NVIDIAModelOptConfig("NVFP4", channel_quantize=-1, block_quantize=16,
        ...                          scale_channel_quantize=-1, scale_block_quantize=4)
        >>> NVIDIAModelOptConfig.from_dict(c.to_dict()) == c
        True
    """

    _method_value = ("modelopt",)
    _derived_keys = ("quant_method", "calib_cfg")

    def __init__(self, quant_type: str, modules_to_not_convert: list[str] | None = None,
                 weight_only: bool = True, channel_quantize: int | None = None,
                 block_quantize: int | None = None, scale_channel_quantize: int | None = None,
                 scale_block_quantize: int | None = None, algorithm: str = "max",
                 forward_loop=None, modelopt_config: dict | None = None,
                 disable_conv_quantization: bool = False):
        self.quant_method = QuantizationMethod.MODELOPT
        self.quant_type = self._check_quant_type(quant_type)
        self.modules_to_not_convert = self._check_modules_list(modules_to_not_convert)
        self.weight_only = check_field("NVIDIAModelOptConfig", "weight_only", weight_only, "bool")
        for field, value, kind in (("channel_quantize", channel_quantize, "int"),
                                   ("block_quantize", block_quantize, "positive int"),
                                   ("scale_channel_quantize", scale_channel_quantize, "int"),
                                   ("scale_block_quantize", scale_block_quantize, "positive int")):
            setattr(self, field, check_field("NVIDIAModelOptConfig", field, value, kind, True))
        if forward_loop is not None and not callable(forward_loop):
            raise ConfigError(f"NVIDIAModelOptConfig.forward_loop={forward_loop!r}: expected a "
                              "callable or None")
        if not isinstance(algorithm, str):
            raise ConfigError(f"NVIDIAModelOptConfig.algorithm={algorithm!r}: expected a string "
                              "such as 'max'")
        self.calib_cfg = {"method": algorithm}  # diffusers' key for the algorithm
        self._forward_loop = forward_loop       # a callable: kept, never serialised
        if modelopt_config is not None and (not isinstance(modelopt_config, dict) or not
                                            isinstance(modelopt_config.get("quant_cfg"),
                                                       (dict, list))):
            raise ConfigError(f"NVIDIAModelOptConfig.modelopt_config: expected a dict with a "
                              f"'quant_cfg' object (or list), got {modelopt_config!r}")
        self.modelopt_config = _canonical(modelopt_config or self.get_config_from_quant_type())
        self.disable_conv_quantization = check_field("NVIDIAModelOptConfig",
                                                     "disable_conv_quantization",
                                                     disable_conv_quantization, "bool")

    @staticmethod
    def _check_quant_type(quant_type) -> str:
        parts = str(quant_type).split("_") if isinstance(quant_type, str) else []
        if not 1 <= len(parts) <= 2 or any(p not in QUANT_TYPE_BITS for p in parts):
            raise ConfigError(f"NVIDIAModelOptConfig.quant_type={quant_type!r}: expected one of "
                              f"{sorted(QUANT_TYPE_BITS)}, optionally '_<activation type>' "
                              "(e.g. 'FP8_FP8')")
        return quant_type

    @property
    def bits(self) -> int:
        """Weight width, for footprint expectations: 8 for FP8/INT8, 4 for the 4-bit formats."""
        return 8 if self.quant_type.split("_")[0] in ("FP8", "INT8") else 4

    @property
    def algorithm(self) -> str:
        return self.calib_cfg.get("method", "max")

    @property
    def forward_loop(self):
        return self._forward_loop

    def get_config_from_quant_type(self) -> dict:
        """The modelopt config diffusers derives from the fields (its legacy flat form)."""
        w_type, _, act_type = self.quant_type.partition("_")
        quant_cfg = {"*weight_quantizer": {"fake_quant": False}, "*input_quantizer": {},
                     "*output_quantizer": {"enable": False}, "*q_bmm_quantizer": {},
                     "*k_bmm_quantizer": {}, "*v_bmm_quantizer": {}, "*softmax_quantizer": {},
                     **_default_disabled_cfg()}
        if self.weight_only:
            for key, body in quant_cfg.items():
                if "*weight_quantizer" not in key and not body:
                    body["enable"] = False
        for key, body in quant_cfg.items():
            if "enable" in body or key.startswith("nn."):
                continue
            if key == "*input_quantizer":
                if act_type:
                    body["num_bits"] = QUANT_TYPE_BITS[act_type]
                continue
            body["num_bits"] = QUANT_TYPE_BITS[w_type]
        w_cfg, in_cfg = quant_cfg["*weight_quantizer"], quant_cfg["*input_quantizer"]
        if self.block_quantize is not None and self.channel_quantize is not None:
            w_cfg["block_sizes"] = {self.channel_quantize: self.block_quantize}
            in_cfg["block_sizes"] = {self.channel_quantize: self.block_quantize, "type": "dynamic"}
        elif self.channel_quantize is not None:
            w_cfg["axis"] = in_cfg["axis"] = self.channel_quantize
            in_cfg["type"] = "dynamic"
        if self.scale_channel_quantize is not None and self.scale_block_quantize is not None:
            for kind, cfg in ((w_type, w_cfg), (act_type, in_cfg)):
                if kind not in QUANT_TYPE_SCALE_BITS:
                    continue
                if "block_sizes" not in cfg:
                    raise ConfigError("NVIDIAModelOptConfig: scale_block_quantize needs "
                                      "channel_quantize and block_quantize to be set too")
                cfg["block_sizes"].update({"scale_bits": QUANT_TYPE_SCALE_BITS[kind],
                                           "scale_block_sizes": {self.scale_channel_quantize:
                                                                 self.scale_block_quantize}})
        return {"quant_cfg": quant_cfg, "algorithm": self.calib_cfg}

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["modelopt_config"] = _jsonable(out["modelopt_config"])
        out["forward_loop"] = None  # diffusers writes this key; a callable is not data
        return out

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        data = {**config_dict, **kwargs}
        if "quant_method" in data:  # diffusers' in-memory dict holds its own enum
            data["quant_method"] = getattr(data["quant_method"], "value", data["quant_method"])
        calib = data.pop("calib_cfg", None)
        if calib is not None and not isinstance(calib, dict):
            raise ConfigError(f"NVIDIAModelOptConfig.calib_cfg={calib!r}: expected an object such "
                              "as {'method': 'max'}")
        if isinstance(calib, dict) and "algorithm" not in data:
            data["algorithm"] = calib.get("method", "max")
        return super().from_dict(data, return_unused_kwargs=return_unused_kwargs)

    in_transformers = False  # transformers loads modelopt checkpoints; it does not quantize

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        """Each type, with ModelOpt's usual block sizes (a CLI scheme cannot carry any)."""
        return {n.lower(): {"quant_type": n, **mm.USUAL_BLOCKS.get(n, {})} for n in QUANT_TYPE_BITS}

    @classmethod
    def cpu_examples(cls) -> list["NVIDIAModelOptConfig"]:
        """One config per scheme that quantizes, runs, saves and reloads on a CPU."""
        blocks = dict(channel_quantize=-1, block_quantize=16)
        scales = dict(blocks, scale_channel_quantize=-1, scale_block_quantize=4)
        return [cls("FP8"), cls("INT8", channel_quantize=0), cls("INT4", **blocks),
                cls("NF4", **scales), cls("NVFP4", **scales)]


# -- the layer ---------------------------------------------------------------------------------
def modelopt_compress(weight: torch.Tensor, attrs: dict) -> tuple[torch.Tensor, dict]:
    """(packed weight, weight_quantizer buffers) exactly as ``mtq.quantize`` + ``mtq.compress``
    (``ops/formats/modelopt.compress``), or an error saying how to install modelopt."""
    require("modelopt.torch.quantization", "modelopt")
    return mm.compress(weight, attrs)


class ModelOptLinear(QuantizedLinear):
    """nn.Linear with a modelopt-compressed weight; state dict keys are modelopt's own.

    ``weight`` holds the packed data, ``weight_quantizer`` (a plain module) the scale buffers.
    """

    def __init__(self, in_features, out_features, bias, scheme: str, attrs: dict,
                 compute_dtype=None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.scheme, self.attrs = scheme, attrs
        self.weight_quantizer = nn.Module()
        self.register_buffer("weight", None)

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        if name == "weight" and tensor.element_size() > 1:
            # full precision (quantize-on-load, or a diffusers checkpoint saved before compress)
            tensor = tensor.to(dtype) if dtype is not None else tensor
            self.compute_dtype = self.compute_dtype or tensor.dtype
            packed, buffers = modelopt_compress(tensor, self.attrs)
            self.weight = packed
            for key, buf in buffers.items():
                self.weight_quantizer.register_buffer(key, buf)
        elif name == "weight":
            self._check_packed(tensor)
            self.weight = tensor
        elif name.startswith("weight_quantizer.") and "." not in name[len("weight_quantizer."):]:
            if tensor.numel() > self.out_features * self.in_features:
                raise CheckpointError(f"modelopt layer ({self.scheme}): {name!r} holds "
                                      f"{tensor.numel()} values, more than the weight's "
                                      f"{self.out_features} x {self.in_features}")
            self.weight_quantizer.register_buffer(name.split(".", 1)[1], tensor)
        else:
            raise CheckpointError(f"modelopt layer ({self.scheme}): unexpected tensor {name!r}; "
                                  "expected weight, bias or weight_quantizer.<_amax|_scale|...>")

    def _check_packed(self, tensor: torch.Tensor) -> None:
        want = mm.packed_weight_mismatch(self.scheme, tensor, self.out_features, self.in_features)
        if want:
            raise CheckpointError(f"modelopt layer ({self.scheme}): 'weight' should be {want}, got "
                                  f"{tensor.dtype} {list(tensor.shape)}; the checkpoint does not "
                                  "match its layer")

    def check_complete(self, name: str) -> None:
        missing = [f"{name}.{k}" for k in ("weight",) if getattr(self, k) is None]
        missing += [f"{name}.weight_quantizer.{k}" for k in SCHEME_PIECES[self.scheme]
                    if getattr(self.weight_quantizer, k, None) is None]
        if missing:
            raise CheckpointError(f"modelopt {self.scheme} checkpoint is missing {missing}; it was "
                                  "not saved by diffquant or by modelopt's mtq.compress")

    def dequantized_weight(self) -> torch.Tensor:
        """The dense (out, in) weight in the compute dtype."""
        return mm.dequantize(self.scheme, self.weight, self.weight_quantizer,
                             self.attrs.get("block_sizes"), (self.out_features, self.in_features),
                             self.compute_dtype or torch.float32)

    def _fast_prepared(self):
        """FP8/INT8 with one scale per row or per tensor: the same dequantization, chunked into
        a reused buffer, for every row count (bit-identical to modelopt's own output, which the
        int8 packed kernel is not); block scales keep the reference path."""
        scale = getattr(self.weight_quantizer, "_scale", None)
        if self.scheme not in ("FP8", "INT8") or self.attrs.get("block_sizes") or scale is None \
                or scale.numel() not in (1, self.out_features) or self.weight.dim() != 2:
            return None
        dtype = self.compute_dtype or torch.float32
        return self.fast_weight(lambda: ci8.prepare_row_scaled(
            self.weight, scale.to(dtype), ROUTES[f"modelopt {self.scheme}"]), self.weight, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out); the weight is dequantized per call (modelopt's CPU fallback)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        w = self._fast_prepared() if self.use_fast_path(x) else None
        if w is not None:
            return fl.linear(x, w, bias)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


# -- the quantizer -----------------------------------------------------------------------------
@register_quantizer("modelopt", NVIDIAModelOptConfig)
class NVIDIAModelOptQuantizer(DiffusersQuantizer):
    """Quantize-on-load, pre-quantized loading and saving for NVIDIAModelOptConfig."""

    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        cfg = self.quantization_config
        if not cfg.weight_only or "_" in cfg.quant_type:
            raise QuantizationError(
                f"modelopt quant_type={cfg.quant_type!r}, weight_only={cfg.weight_only}: "
                "activation quantization needs calibration with a forward_loop and modelopt's "
                "real-quant GEMM kernels, which diffquant does not run; use weight_only=True with "
                f"one of {', '.join(CPU_SCHEMES)} (all run on CPU and GPU)")
        if cfg.algorithm != "max":
            raise QuantizationError(f"modelopt algorithm={cfg.algorithm!r}: only 'max' calibration "
                                    "(weight-only, no data) is supported, as in diffusers")
        if not self.pre_quantized:
            require("modelopt.torch.quantization", "modelopt")

    def update_torch_dtype(self, torch_dtype):
        return torch.float32 if torch_dtype is None else torch_dtype  # as diffusers

    def preprocess_model(self, model, keep_in_fp32_modules=(), **kwargs) -> None:
        if not self.quantization_config.disable_conv_quantization and any(
                isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
            logger.warning("modelopt: convolution layers stay in full precision in diffquant "
                           "(diffusers would quantize them unless disable_conv_quantization=True)")
        super().preprocess_model(model, keep_in_fp32_modules=keep_in_fp32_modules, **kwargs)

    def make_layer(self, name: str, module: nn.Module):
        quant_cfg = self.quantization_config.modelopt_config["quant_cfg"]
        attrs = resolve_quantizer(quant_cfg, f"{name}.weight_quantizer", module)
        if attrs is None:
            return module  # disabled by a modelopt pattern (e.g. *proj_out.*): stays nn.Linear
        scheme = scheme_of(attrs, f"layer {name!r}")
        return ModelOptLinear(module.in_features, module.out_features, module.bias is not None,
                              scheme, attrs)

    def _layer_of(self, model, key: str):
        # "<layer>.weight_quantizer._scale" belongs to <layer>, not to its weight_quantizer child
        layer_name, sep, _ = key.rpartition(".weight_quantizer.")
        module, rel = owner_of(model, key)
        if sep and isinstance(model.get_submodule(layer_name), ModelOptLinear):
            return model.get_submodule(layer_name), key[len(layer_name) + 1:]
        return (module, rel) if isinstance(module, ModelOptLinear) else (None, rel)

    def create_quantized_param(self, model, key, tensor, dtype, device) -> None:
        super().create_quantized_param(model, key, tensor, dtype, device)
        if dtype is not None:
            self._layer_of(model, key)[0].compute_dtype = dtype

    def postprocess_model(self, model, **kwargs) -> None:
        for name, module in model.named_modules():
            if isinstance(module, ModelOptLinear):
                module.check_complete(name)

    def scheme_name(self) -> str:
        return f"modelopt {self.quantization_config.quant_type}"
