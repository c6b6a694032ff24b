"""diffusers' model classes with diffquant's loading: every family diffquant does not implement.

``diffusers_class("WanTransformer3DModel")`` is a subclass of diffusers' class whose loading,
saving and quantization state are diffquant's ``ModelMixin``: the architecture (forward, config,
attention processors, LoRA methods) is diffusers' own code, while ``from_pretrained`` builds it
with its parameters on the meta device, lets the quantizer swap its ``nn.Linear`` layers, and
streams the checkpoint into it one tensor at a time, exactly as for the native Flux models. So
every backend, the fast CPU layers, ``get_memory_footprint``, ``dequantize`` and the atomic
``save_pretrained`` apply to any diffusers model. The subclass keeps diffusers' class name, so
its config.json is the one diffusers writes and reads.

``AutoModel``, ``DiffusionPipeline`` and ``import diffquant; diffquant.WanTransformer3DModel``
reach these classes by name; diffusers is needed only then (``pip install 'diffquant[diffusers]'``).

Example:
    >>> from diffquant import TorchAoConfig, diffusers_class
    >>> Wan = diffusers_class("WanTransformer3DModel")                          # doctest: +SKIP
    >>> t = Wan.from_pretrained("wan_dir", subfolder="transformer",             # doctest: +SKIP
    ...                         quantization_config=TorchAoConfig("int8wo"))
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import nn

from .configuration import ConfigMixin
from .errors import BackendUnavailableError, ConfigError
from .model_state import ModelState
from .modeling import ModelMixin, _set_tensor

EXTRA = "diffquant[diffusers]"
# Class attributes diffquant's ModelMixin also defines: the subclass takes diffusers' values, which
# say what its loading keeps in float32 and how offloading may split it.
_CLASS_ATTRIBUTES = ("_keep_in_fp32_modules", "_no_split_modules", "_supports_gradient_checkpointing",
                     "_skip_layerwise_casting_patterns")

_CLASSES: dict[str, type] = {}
_PATCH = threading.Lock()


def require_diffusers(what: str):
    """The diffusers module, or an error naming ``what`` needed it and the extra to install."""
    try:
        import diffusers
    except ImportError as err:
        raise BackendUnavailableError(
            f"{what} is not implemented by diffquant; it loads through diffusers' own class, which "
            f"needs the 'diffusers' package: pip install '{EXTRA}' ({err})") from err
    return diffusers


def diffusers_base(name: str, kind: str, where: str | None = None) -> type:
    """diffusers' class ``name``, which must subclass ``diffusers.<kind>`` (ModelMixin, ...)."""
    what = {"ModelMixin": "model", "DiffusionPipeline": "pipeline"}.get(kind, kind)
    diffusers = require_diffusers(f"{what} class {name!r}")
    base = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(base, type) and issubclass(base, getattr(diffusers, kind))):
        raise ConfigError(f"{where + ': ' if where else ''}{name!r} is neither a class diffquant "
                          f"implements nor a diffusers {diffusers.__version__} {kind} class; check "
                          "the name (or upgrade diffusers)")
    return base


def diffusers_class(name: str, where: str | None = None) -> type:
    """diffusers' model class ``name`` with diffquant's ModelMixin (one class per name).

    ``where`` (a file) prefixes the error when diffusers has no such model class.

    Example:
        >>> Sd3 = diffusers_class("SD3Transformer2DModel")                  # doctest: +SKIP
        >>> issubclass(Sd3, diffusers.SD3Transformer2DModel)                # doctest: +SKIP
        True
    """
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    base = diffusers_base(name, "ModelMixin", where)
    attributes = {a: getattr(base, a) for a in _CLASS_ATTRIBUTES if hasattr(base, a)}
    cls = type(name, (DiffusersModelMixin, base), {
        "__module__": __name__, "__qualname__": name, "_diffusers_class": base,
        "__doc__": f"diffusers' {name} loaded, quantized and saved by diffquant.", **attributes})
    return _CLASSES.setdefault(name, cls)


def __getattr__(name: str):
    """``diffquant.diffusers_bridge.<Class>``: where pickle finds a bridged class by name."""
    if name[:1].isupper():
        return diffusers_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created by this thread inside the block are put on the meta device; buffers
    stay real. diffusers builds its models so (accelerate's ``init_empty_weights``): buffers such
    as rope frequencies are computed in ``__init__`` and are not in the checkpoint, so they must
    hold their values. Each parameter is allocated (torch.empty, untouched) and moved at once,
    so the peak is one parameter."""
    original = nn.Module.register_parameter
    owner = threading.get_ident()

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta and threading.get_ident() == owner:
            kwargs = {**module._parameters[name].__dict__, "requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    with _PATCH:  # one patch at a time, so the original is always the one restored
        nn.Module.register_parameter = register
        try:
            yield
        finally:
            nn.Module.register_parameter = original


class _Renamed:
    """A checkpoint seen under other key names: {name the model has: name in the file}."""

    def __init__(self, ckpt, names: dict[str, str]):
        self._ckpt, self._names = ckpt, names

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key):
        return self._ckpt.shape(self._names[key])

    def dtype(self, key):
        return self._ckpt.dtype(self._names[key])

    def tensor(self, key, *args):
        return self._ckpt.tensor(self._names[key], *args)

    def file_of(self, key):
        return self._ckpt.file_of(self._names[key])


class DiffusersModelMixin(ModelMixin):
    """diffquant's loading, saving and quantization state over a diffusers model class.

    Comes first in the bases of the classes ``diffusers_class`` makes, so diffquant's
    ``from_pretrained``, ``from_single_file``, ``save_pretrained``, ``dequantize``,
    ``get_memory_footprint`` and ``to`` apply; ``dtype``, ``device`` and ``num_parameters``
    stay diffusers' (its pipelines rely on their exact meaning): ``super(ModelState, self)``
    skips ModelMixin and its base ModelState, both diffquant's, to reach diffusers' class.
    """

    _diffusers_class: type | None = None
    init_kwargs_from_config = ConfigMixin.__dict__["init_kwargs_from_config"]

    @classmethod
    def _build_on_meta(cls, config: dict, config_path: Path, per_param: float = 0.5,
                       device=None):
        from .limits import check_fits

        config = {k: v for k, v in config.items() if k != "quantization_config"}
        try:
            with parameters_on_meta():
                model = cls.from_config(config)  # diffusers' own: deprecated keys, hidden fields
        except (TypeError, ValueError, AssertionError, KeyError) as err:
            raise ConfigError(f"{config_path}: cannot build {cls.__name__} from this config "
                              f"({type(err).__name__}: {err}); check the values") from err
        return check_fits(model, config_path, per_param, device)

    def _target_dtype(self, key: str, dtype):
        # diffusers' rule: float32 where a dotted part of the key is a _keep_in_fp32_modules
        # entry (it names parameters, e.g. Wan's scale_shift_table, as well as modules)
        keep = self._keep_in_fp32_modules or ()
        if dtype is not None and any(part in keep for part in key.split(".")):
            return torch.float32
        return dtype

    def _assign_from(self, ckpt, dtype, device, quantizer) -> None:
        names = {key: key for key in ckpt.keys()}
        self._fix_state_dict_keys_on_load(names)  # diffusers' renames of pre-0.14 attention blocks
        if any(new != old for new, old in names.items()):
            ckpt = _Renamed(ckpt, names)
        super()._assign_from(ckpt, dtype, device, quantizer)
        if device is not None:  # buffers computed in __init__ follow the loaded tensors
            for name, buffer in list(self.named_buffers()):
                if buffer.device != device:
                    _set_tensor(self, name, buffer.to(device))

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """A ``.gguf`` or ``.safetensors`` file in the original layout of this family, its keys
        converted by diffusers' own converter (``diffusers.loaders.single_file_utils``).

        Example:
            >>> Wan = diffusers_class("WanTransformer3DModel")                      # doctest: +SKIP
            >>> t = Wan.from_single_file("wan2.1-t2v-14b-Q4_0.gguf", config="wan_dir",   # doctest: +SKIP
            ...         quantization_config=GGUFQuantizationConfig(torch.bfloat16))
        """
        from .diffusers_single_file import load_converted_single_file

        return load_converted_single_file(cls, pretrained_model_link_or_path, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return super(ModelState, self).dtype

    @property
    def device(self) -> torch.device:
        return super(ModelState, self).device

    def num_parameters(self, *args, **kwargs) -> int:
        return super(ModelState, self).num_parameters(*args, **kwargs)


__all__ = ["DiffusersModelMixin", "diffusers_class", "parameters_on_meta", "require_diffusers"]
