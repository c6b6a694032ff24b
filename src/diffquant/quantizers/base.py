"""DiffusersQuantizer: the lifecycle contract every backend implements, kept small.

Every loader (``ModelMixin.from_pretrained``, ``from_single_file``) runs it through
``ModelMixin._load_quantized``: validate_environment, update_torch_dtype, preprocess_model (swap
nn.Linear for the backend's layer, on meta), then for each checkpoint tensor
check_if_quantized_param / create_quantized_param, then postprocess_model.

Most backends only write a layer class (a ``QuantizedLinear`` with plain tensor buffers, so
its state dict is its on-disk format) and ``make_layer``; the defaults do the rest.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CheckpointError, QuantizationError
from ..module_names import matches_any
from ..reachable import reachable_tensors

_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own attributes: tensors, hooks


class QuantizedLinear(nn.Module):
    """Base of the backends' linear layers: plain buffers, math in forward.

    Subclasses implement ``load_piece`` (a full-precision ``weight`` to quantize, or one stored
    piece of an already quantized one), ``dequantized_weight`` and ``forward``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_piece(self, name: str, tensor: torch.Tensor, *, pre_quantized: bool, dtype, device):
        raise NotImplementedError

    # -- the fast CPU path (ops/cpu/, dispatch.py): derived at first use, never in the state dict
    _fast = None  # (stored tensors it derives from, their versions, the prepared weight)

    def fast_weight(self, build, *tensors: torch.Tensor):
        """``build()``'s prepared weight, cached until one of ``tensors`` (the stored pieces it
        derives from) is replaced or changed in place, or the layer is moved or cast."""
        versions = tuple(0 if t.is_inference() else t._version for t in tensors)
        cached = self._fast
        if cached is None or cached[1] != versions or any(a is not b for a, b in
                                                          zip(cached[0], tensors)):
            cached = self._fast = (tensors, versions, build())
        return cached[2]

    @staticmethod
    def use_fast_path(x: torch.Tensor) -> bool:
        """The fast kernels are measured and tested on CPUs; other devices keep the reference
        (their libraries' own) path, and so do autograd and tracing by torch.compile."""
        return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) \
            and not torch.compiler.is_compiling()

    def kept_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps beside its parameters and buffers: its prepared form
        for the fast path and what any of its attributes holds (a cast scale, a decoded table).
        ``get_memory_footprint`` counts them, so the footprint is what the layer holds."""
        own = {k: v for k, v in vars(self).items() if k not in _MODULE_STATE}
        return reachable_tensors(own)

    def _apply(self, fn, recurse=True):
        self._fast = None  # it holds the tensors from before the move or cast
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**self.__dict__, "_fast": None}  # closures do not pickle; rebuilt on use

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class PiecesLinear(QuantizedLinear):
    """A QuantizedLinear whose stored pieces have dotted on-disk names ("weight.absmax",
    "weight._data") that nn.Module cannot register: ``pieces`` maps each on-disk name to the
    buffer holding it (bitsandbytes and quanto store their layers so)."""

    def _init_pieces(self, pieces: dict[str, str]) -> None:
        self.pieces = dict(pieces)
        for attr in self.pieces.values():
            self.register_buffer(attr, None)  # None until loaded: a missing piece stays visible
        self._loaded: set[str] = set()

    def required_pieces(self) -> list[str]:
        return list(self.pieces)

    def missing_pieces(self) -> list[str]:
        return [p for p in self.required_pieces() if p not in self._loaded]

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        setattr(self, self.pieces[name], tensor)
        self._loaded.add(name)

    def _is_piece(self, rel: str) -> bool:
        """Whether state-dict key ``rel`` (relative to this layer) goes to ``load_piece``."""
        return rel in self.pieces

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rel = key[len(prefix):]
            if rel == "bias" and self.bias is not None:
                self.bias = torch.nn.Parameter(state_dict[key].detach().clone(), requires_grad=False)
            elif self._is_piece(rel):
                self.load_piece(rel, state_dict[key].clone(), pre_quantized=True, dtype=None,
                                device=None)
        missing_keys.extend(prefix + p for p in self.missing_pieces())

    def check_complete(self, name: str, backend: str) -> None:
        """Raise naming every piece of layer ``name`` the ``backend`` checkpoint did not hold."""
        missing = self.missing_pieces()
        if missing:
            keys = ", ".join(f"{name}.{p}" for p in missing)
            raise CheckpointError(f"{backend} checkpoint is missing {keys}; every quantized layer "
                                  f"needs {self.required_pieces()}; re-save the model")


def owner_of(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The deepest module owning ``key`` and the key relative to it ("a.b.weight.absmax")."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            return model.get_submodule(".".join(parts[:cut])), ".".join(parts[cut:])
        except AttributeError:
            continue
    return model, key


class DiffusersQuantizer:
    """Base quantizer. ``pre_quantized`` says whether the checkpoint already holds quantized data."""

    default_torch_dtype: torch.dtype | None = None  # diffusers' choice when none is given
    layer_types: tuple = (nn.Linear,)  # module types a backend converts

    def __init__(self, quantization_config, pre_quantized: bool = True, **kwargs):
        self.quantization_config = quantization_config
        self.pre_quantized = pre_quantized
        self.modules_to_not_convert = list(getattr(quantization_config, "modules_to_not_convert",
                                                   None) or [])

    # -- environment -----------------------------------------------------------------------
    def validate_environment(self, torch_dtype=None, device_map=None, **kwargs) -> None:
        """Raise if the backend's library is missing or the scheme cannot run here."""

    def update_torch_dtype(self, torch_dtype):
        """``torch_dtype``, or ``default_torch_dtype`` when None; kept as ``self.torch_dtype``."""
        if torch_dtype is None and self.default_torch_dtype is not None:
            torch_dtype = self.default_torch_dtype
            logging.getLogger(type(self).__module__).info(
                "%s: torch_dtype not given, using %s as diffusers does",
                self.quantization_config.quant_method.value, torch_dtype)
        self.torch_dtype = torch_dtype
        return torch_dtype

    # -- model surgery ---------------------------------------------------------------------
    def preprocess_model(self, model: nn.Module, keep_in_fp32_modules=(), **kwargs) -> None:
        """Swap convertible layers for quantized ones; honours modules_to_not_convert."""
        skip = list(self.modules_to_not_convert) + list(keep_in_fp32_modules or ())
        self.modules_to_not_convert = skip
        for name, module in list(model.named_modules()):
            if isinstance(module, self.layer_types) and not matches_any(name, skip):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, self.make_layer(name, module))
        model.is_quantized = True
        model.quantization_method = self.quantization_config.quant_method

    def make_layer(self, name: str, module: nn.Module) -> QuantizedLinear:
        """The quantized replacement of ``module`` (built on meta, filled while loading)."""
        raise NotImplementedError

    def _layer_of(self, model: nn.Module, key: str) -> tuple[nn.Module | None, str]:
        """The module that loads ``key`` and the key relative to it; backends whose layers own
        keys held by a child module (modelopt's ``weight_quantizer._scale``) override it."""
        return owner_of(model, key)

    def check_if_quantized_param(self, model: nn.Module, key: str, checkpoint=None) -> bool:
        module, rel = self._layer_of(model, key)
        return isinstance(module, QuantizedLinear) and rel != "bias"

    def create_quantized_param(self, model: nn.Module, key: str, tensor: torch.Tensor, dtype,
                               device) -> None:
        module, rel = self._layer_of(model, key)
        if device is not None:
            tensor = tensor.to(device)
        module.load_piece(rel, tensor, pre_quantized=self.pre_quantized, dtype=dtype, device=device)

    def postprocess_model(self, model: nn.Module, **kwargs) -> None:
        """Called once every tensor is in place."""

    def get_state_dict_and_metadata(self, model: nn.Module, state_dict: dict) -> tuple[dict, dict]:
        """The tensors ``save_pretrained`` writes and extra safetensors metadata (diffusers' hook of
        this name): the state dict as it is, by default; torchao writes its library's layout."""
        return state_dict, {}

    # -- after loading ---------------------------------------------------------------------
    def dequantize(self, model: nn.Module) -> nn.Module:
        """Replace every quantized layer by an nn.Linear holding its dequantized weight."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, QuantizedLinear):
                continue
            weight = module.dequantized_weight()
            dtype = module.compute_dtype or weight.dtype
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
            linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        return model

    def scheme_name(self) -> str:
        """A short human name of the scheme, for messages and `diffquant inspect`."""
        return str(self.quantization_config.quant_method)

    @property
    def is_serializable(self) -> bool:
        return True


def require(package: str, extra: str):
    """Import ``package`` or raise an error that says how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"this backend needs the '{package}' package: "
                                      f"pip install 'diffquant[{extra}]' ({err})") from err


def require_installed(package: str, extra: str) -> None:
    """``require`` without the import, for a backend whose package is needed only later (or on
    other devices) and slow to import."""
    import importlib.util

    try:
        found = importlib.util.find_spec(package) is not None
    except ImportError:  # a missing parent package
        found = False
    if not found:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"this backend needs the '{package}' package: "
                                      f"pip install 'diffquant[{extra}]' (not installed)")


__all__ = ["DiffusersQuantizer", "PiecesLinear", "QuantizedLinear", "QuantizationError", "owner_of",
           "require", "require_installed"]
