"""bitsandbytes: LLM.int8() 8-bit and QLoRA 4-bit (NF4/FP4) weights, on a CPU too.

diffusers refuses bitsandbytes without a GPU; bitsandbytes itself runs on a CPU, so here it
does. The layers keep plain tensor buffers in exactly bitsandbytes' serialized layout, so a
checkpoint moves both ways between diffusers and diffquant:

- 4-bit: ``weight`` (packed, shape [ceil(out*in/2), 1]), ``weight.absmax``, ``weight.quant_map``,
  with double quant also ``weight.nested_absmax``, ``weight.nested_quant_map``, and the JSON
  blob ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) holding shape/dtype/blocksize;
- 8-bit: ``weight`` (int8 [out, in]), ``SCB`` (float32 [out] row absmax), ``weight_format`` (0).

The math is bitsandbytes' own (``quantize_4bit``, ``matmul_4bit``, ``int8_vectorwise_quant``,
``matmul``), so outputs match its ``Linear4bit``/``Linear8bitLt``.

Example:
    >>> import torch
    >>> from diffquant import BitsAndBytesConfig
    >>> cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    ...                          bnb_4bit_compute_dtype=torch.bfloat16)
    >>> cfg.registry_key()
    'bitsandbytes_4bit'
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, ConfigError, QuantizationError
from ..ops.cpu import int4 as f4
from ..ops.cpu import quantize as cq
from .auto import register_quantizer
from .base import DiffusersQuantizer, PiecesLinear, require
from .bitsandbytes_state import (check_packed_weight, check_statistics, quant_state_blob,
                                 quant_state_fields)
from .config import (QuantizationConfigMixin, QuantizationMethod, check_field, dtype_to_str,
                     str_to_dtype)

_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
_QUANT_TYPES = ("fp4", "nf4")


def _bnb():
    return require("bitsandbytes", "bitsandbytes")


class BitsAndBytesConfig(QuantizationConfigMixin):
    """diffusers' BitsAndBytesConfig: ``load_in_8bit`` (LLM.int8()) or ``load_in_4bit`` (NF4/FP4).

    Example:
        >>> from diffquant import BitsAndBytesConfig
        >>> BitsAndBytesConfig(load_in_8bit=True).to_dict()["quant_method"]
        'bitsandbytes'
    """

    _method_value = ("bitsandbytes",)
    # to_dict writes diffusers' private copies of the two switches; from_dict ignores them
    _derived_keys = ("quant_method", "_load_in_4bit", "_load_in_8bit")

    def __init__(self, load_in_8bit=False, load_in_4bit=False, llm_int8_threshold=6.0,
                 llm_int8_skip_modules=None, llm_int8_enable_fp32_cpu_offload=False,
                 llm_int8_has_fp16_weight=False, bnb_4bit_compute_dtype=None,
                 bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                 bnb_4bit_quant_storage=None):
        self.quant_method = QuantizationMethod.BITS_AND_BYTES
        for field, value in (("load_in_8bit", load_in_8bit), ("load_in_4bit", load_in_4bit),
                             ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
                             ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
                             ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)):
            if not isinstance(value, bool):
                raise ConfigError(f"BitsAndBytesConfig.{field}={value!r}: expected True or False")
        if load_in_4bit and load_in_8bit:
            raise ConfigError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are both True, but "
                              "only one can be used at a time; set one of them to False")
        self._load_in_8bit, self._load_in_4bit = load_in_8bit, load_in_4bit
        check_field("BitsAndBytesConfig", "llm_int8_threshold", llm_int8_threshold, "number")
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = self._check_modules_list(llm_int8_skip_modules,
                                                              "llm_int8_skip_modules")
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        if not isinstance(bnb_4bit_quant_type, str) or bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ConfigError(f"BitsAndBytesConfig.bnb_4bit_quant_type={bnb_4bit_quant_type!r}: "
                              f"expected one of {_QUANT_TYPES}")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = str_to_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype",
                                                   "BitsAndBytesConfig") or torch.float32
        storage = str_to_dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage",
                               "BitsAndBytesConfig") or torch.uint8
        if dtype_to_str(storage) not in _STORAGE_DTYPES:
            raise ConfigError(f"BitsAndBytesConfig.bnb_4bit_quant_storage={bnb_4bit_quant_storage!r}:"
                              f" expected one of {_STORAGE_DTYPES}")
        self.bnb_4bit_quant_storage = storage

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4 if self.load_in_4bit else 16

    @property
    def modules_to_not_convert(self):
        return self.llm_int8_skip_modules

    def to_dict(self) -> dict:
        """diffusers' keys and order, so config.json reads the same in both libraries."""
        return {"quant_method": "bitsandbytes", "_load_in_8bit": self.load_in_8bit,
                "_load_in_4bit": self.load_in_4bit, "llm_int8_threshold": self.llm_int8_threshold,
                "llm_int8_skip_modules": None if self.llm_int8_skip_modules is None
                else list(self.llm_int8_skip_modules),
                "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
                "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
                "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
                "bnb_4bit_compute_dtype": dtype_to_str(self.bnb_4bit_compute_dtype),
                "bnb_4bit_quant_storage": dtype_to_str(self.bnb_4bit_quant_storage),
                "load_in_4bit": self.load_in_4bit, "load_in_8bit": self.load_in_8bit}

    def quantization_method(self):
        """diffusers' name of the scheme: "llm_int8", "nf4", "fp4", or None."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def registry_key(self) -> str:
        if not self.is_quantizable():
            raise ConfigError("BitsAndBytesConfig: neither load_in_4bit nor load_in_8bit is True; "
                              "set one of them to choose 4-bit (NF4/FP4) or 8-bit (LLM.int8())")
        return "bitsandbytes_8bit" if self.load_in_8bit else "bitsandbytes_4bit"

    cli_aliases = {"8bit": "int8", "llm.int8": "int8", "4bit": "nf4"}

    @classmethod
    def cli_schemes(cls) -> dict[str, dict]:
        """bitsandbytes has no single scheme field: its CLI names stand for these kwargs."""
        return {**{t + dq: {"load_in_4bit": True, "bnb_4bit_quant_type": t,
                            **({"bnb_4bit_use_double_quant": True} if dq else {})}
                   for dq in ("", "-dq") for t in ("nf4", "fp4")}, "int8": {"load_in_8bit": True}}

    @classmethod
    def cpu_examples(cls) -> list["BitsAndBytesConfig"]:
        return [cls(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                cls(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="bfloat16"),
                cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="bfloat16"),
                cls(load_in_8bit=True)]


class _PiecesLinear(PiecesLinear):
    """A bitsandbytes layer: ``PIECES`` maps each on-disk name ("weight.absmax") to its buffer;
    saved in bitsandbytes' key order, with its constant pieces."""

    PIECES: dict[str, str] = {}

    def _is_piece(self, rel: str) -> bool:
        return "." not in rel or rel.startswith("weight.")

    def _disk_name(self, name: str) -> str:
        return name

    def _constant_pieces(self) -> dict[str, torch.Tensor]:
        return {}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, attr in self.PIECES.items():
            t = getattr(self, attr)
            if t is not None:
                destination[prefix + self._disk_name(name)] = t if keep_vars else t.detach()
            if name == "weight" and self.bias is not None:  # bitsandbytes' order: weight, bias, ...
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, t in self._constant_pieces().items():
            destination[prefix + name] = t

    def _bad_piece(self, name: str):
        raise CheckpointError(f"{type(self).__name__}: unexpected tensor {name!r} for a "
                              f"bitsandbytes layer; expected pieces {self.required_pieces()}")


class BnB4BitLinear(_PiecesLinear):
    """NF4/FP4 weight in bitsandbytes' packed layout; forward is ``bitsandbytes.matmul_4bit``."""

    PIECES = {"weight": "weight", "weight.absmax": "weight_absmax",
              "weight.quant_map": "weight_quant_map", "weight.nested_absmax": "weight_nested_absmax",
              "weight.nested_quant_map": "weight_nested_quant_map",
              "weight.quant_state": "weight_quant_state"}  # the JSON blob, suffixed on disk

    def __init__(self, in_features, out_features, bias, compute_dtype=None, *, quant_type="fp4",
                 double_quant=False, quant_storage=torch.uint8, bnb_compute_dtype=None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.quant_type, self.double_quant = quant_type, double_quant
        self.quant_storage, self.bnb_compute_dtype = quant_storage, bnb_compute_dtype
        self._init_pieces(self.PIECES)
        self._meta: dict | None = None  # the blob's non-tensor fields (shape, dtype, blocksize...)
        self._qs_cache = (None, None)

    @property
    def state_key(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}"

    def required_pieces(self) -> list[str]:
        skip = () if self.double_quant else ("weight.nested_absmax", "weight.nested_quant_map")
        return [p if p != "weight.quant_state" else self.state_key for p in self.PIECES
                if p not in skip]

    def _put(self, name, tensor):
        super()._put("weight.quant_state" if name == self.state_key else name, tensor)
        self._loaded.add(name)

    def _disk_name(self, name):
        return self.state_key if name == "weight.quant_state" else name

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        if not pre_quantized:
            if name != "weight":
                self._bad_piece(name)
            self._quantize(tensor if dtype is None else tensor.to(dtype))
            return
        if name.startswith("weight.quant_state.") and name != self.state_key:
            raise CheckpointError(f"BnB4BitLinear: the checkpoint holds {name!r} but its config says "
                                  f"bnb_4bit_quant_type={self.quant_type!r} (expected "
                                  f"{self.state_key!r}); fix quantization_config in config.json")
        if name not in self.required_pieces():
            self._bad_piece(name)
        if name == "weight":
            check_packed_weight(self, tensor)
        if name == self.state_key:
            self._meta = quant_state_blob(tensor, (self.out_features, self.in_features))
        self._put(name, tensor)

    def check_complete(self, name: str, backend: str) -> None:
        super().check_complete(name, backend)
        if self._meta is not None:  # the statistics must cover the weight's blocks, exactly
            check_statistics(self, name)

    def _quantize(self, w: torch.Tensor) -> None:
        """bitsandbytes' blockwise 4-bit quantization (blocksize 64, as Params4bit uses)."""
        packed, state = cq.bnb_quantize_4bit(w.contiguous(), self.quant_type, self.double_quant,
                                             self.quant_storage)
        self._meta = {k: v for k, v in state.as_dict().items() if not isinstance(v, torch.Tensor)}
        self._put("weight", packed)  # [ceil(out*in/2) / storage bytes, 1]
        for name, t in state.as_dict(packed=True).items():
            self._put("weight." + name, t)

    def quant_state(self):
        """bitsandbytes' QuantState over this layer's buffers (rebuilt after a device move)."""
        if self._qs_cache[0] is not self.weight_absmax:
            state = _bnb().functional.QuantState.from_dict(quant_state_fields(self),
                                                           device=self.weight_absmax.device)
            self._qs_cache = (self.weight_absmax, state)
        return self._qs_cache[1]

    def dequantized_weight(self) -> torch.Tensor:
        return _bnb().functional.dequantize_4bit(self.weight, self.quant_state())  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as Linear4bit: compute in bnb_4bit_compute_dtype (or the input's), return input dtype
        inp_dtype = x.dtype
        cdt = self.bnb_compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(cdt)
        if cdt == torch.bfloat16 and self.use_fast_path(x) and f4.lut4_runs_here():
            return self._forward_c(x.to(cdt), bias).to(inp_dtype)
        out = _bnb().matmul_4bit(x.to(cdt), self.weight, quant_state=self.quant_state(), bias=bias)
        return out.to(inp_dtype)

    def _forward_c(self, x: torch.Tensor, bias) -> torch.Tensor:
        lut, absmax = self.fast_weight(self._lut4_tables, self.weight, self.weight_absmax)
        if absmax is None:  # double quantization: expanded for this call only (see _lut4_tables)
            absmax = self._absmax(self.quant_state())
        return f4.linear_lut4(x, self.weight, lut, absmax, self._meta["blocksize"],
                              (self.out_features, self.in_features), bias)

    def _lut4_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # kept for the layer's forwards by fast_weight (ops/cpu/int4.lut4_tables says what)
        return f4.lut4_tables(self.quant_state())

    _absmax = staticmethod(f4.lut4_absmax)  # absmax per block in float32 (double quant decoded)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant_type={self.quant_type}, double_quant={self.double_quant}"


class BnB8BitLinear(_PiecesLinear):
    """LLM.int8() weight: int8 rows and their absmax ``SCB``; forward is ``bitsandbytes.matmul``."""

    PIECES = {"weight": "weight", "SCB": "SCB"}

    def __init__(self, in_features, out_features, bias, compute_dtype=None, *, threshold=6.0):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.threshold = threshold
        self._init_pieces(self.PIECES)

    def _constant_pieces(self):
        # bitsandbytes writes the (only remaining) row-major format id for older readers
        return {"weight_format": torch.tensor(0, dtype=torch.uint8)}

    def load_piece(self, name, tensor, *, pre_quantized, dtype, device):
        if not pre_quantized:
            if name != "weight":
                self._bad_piece(name)
            w = tensor if dtype is None else tensor.to(dtype)
            # as Int8Params._quantize: rows quantized from float16
            cb, scb = cq.bnb_int8_vectorwise(w.contiguous())
            self._put("weight", cb)  # [out, in] int8
            self._put("SCB", scb)  # [out] float32
            return
        if name == "weight_format":
            if int(tensor.item()) != 0:
                raise CheckpointError(f"BnB8BitLinear: weight_format={int(tensor.item())}, only 0 "
                                      "(row-major) is supported; re-save it with bitsandbytes>=0.45")
            return
        if name not in self.PIECES:
            self._bad_piece(name)
        want = {"weight": (torch.int8, (self.out_features, self.in_features)),
                "SCB": (torch.float32, (self.out_features,))}[name]
        if (tensor.dtype, tuple(tensor.shape)) != want:
            raise CheckpointError(f"BnB8BitLinear: {name!r} should be {str(want[0])[6:]} "
                                  f"{list(want[1])}, "
                                  f"got {tensor.dtype} {list(tensor.shape)}; is this checkpoint "
                                  "really 8-bit?")
        self._put(name, tensor)

    def dequantized_weight(self) -> torch.Tensor:
        return _bnb().functional.int8_vectorwise_dequant(self.weight, self.SCB)  # [out, in] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        state = bnb.MatmulLtState()  # as Linear8bitLt's, rebuilt so it never holds stale tensors
        state.CB, state.SCB, state.threshold = self.weight, self.SCB, self.threshold
        state.has_fp16_weights, state.is_training = False, self.training
        state.use_pool = self.threshold > 0.0
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul(x, self.weight, bias=bias, state=state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


class _BnBQuantizer(DiffusersQuantizer):
    default_torch_dtype = torch.float16

    def __init__(self, quantization_config, pre_quantized: bool = True, **kwargs):
        super().__init__(quantization_config, pre_quantized=pre_quantized, **kwargs)
        self.torch_dtype = None

    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        _bnb()
        if self.quantization_config.llm_int8_has_fp16_weight:
            raise QuantizationError("BitsAndBytesConfig.llm_int8_has_fp16_weight=True keeps 16-bit "
                                    "weights for training; diffquant loads bitsandbytes for "
                                    "inference only, set it to False")

    def postprocess_model(self, model, **kwargs) -> None:
        for name, module in model.named_modules():
            if isinstance(module, _PiecesLinear):
                module.check_complete(name, "bitsandbytes")


@register_quantizer("bitsandbytes_4bit", BitsAndBytesConfig)
class BnB4BitQuantizer(_BnBQuantizer):
    """4-bit NF4/FP4 (QLoRA) through bitsandbytes; runs wherever bitsandbytes does, CPU included."""

    def make_layer(self, name, module):
        c = self.quantization_config
        with torch.device("meta"):  # the bias is filled from the checkpoint
            return BnB4BitLinear(module.in_features, module.out_features, module.bias is not None,
                                 quant_type=c.bnb_4bit_quant_type,
                                 double_quant=c.bnb_4bit_use_double_quant,
                                 quant_storage=c.bnb_4bit_quant_storage,
                                 bnb_compute_dtype=c.bnb_4bit_compute_dtype)

    def scheme_name(self) -> str:
        c = self.quantization_config
        return f"bnb {c.bnb_4bit_quant_type}" + (" double-quant" if c.bnb_4bit_use_double_quant
                                                 else "")


@register_quantizer("bitsandbytes_8bit", BitsAndBytesConfig)
class BnB8BitQuantizer(_BnBQuantizer):
    """8-bit LLM.int8() through bitsandbytes; runs wherever bitsandbytes does, CPU included."""

    def make_layer(self, name, module):
        with torch.device("meta"):
            return BnB8BitLinear(module.in_features, module.out_features, module.bias is not None,
                                 compute_dtype=self.torch_dtype,
                                 threshold=self.quantization_config.llm_int8_threshold)

    def scheme_name(self) -> str:
        return "bnb llm_int8"
