"""ModelMixin: from_pretrained / save_pretrained for diffquant models (dequantize and footprint:
model_state.py).

Loading is skeleton on meta, swap, assign: the model is built on the meta device (no memory),
a quantizer may swap in quantized layers, then tensors are streamed from the checkpoint one at a
time and assigned, so peak memory is the finished model plus one tensor.

Example:
    >>> import torch
    >>> from diffquant import FluxTransformer2DModel, TorchAoConfig
    >>> m = FluxTransformer2DModel.from_pretrained("dir", subfolder="transformer",   # doctest: +SKIP
    ...         quantization_config=TorchAoConfig("int8wo"), torch_dtype=torch.bfloat16)
    >>> m.save_pretrained("out")                                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory
from .checkpoint import Checkpoint, find_weights, write_sharded
from .errors import CheckpointError, ConfigError, DiffquantError, QuantizationError
from .hub import push_folder, resolve_dir, split_hub_kwargs
from .limits import bytes_per_parameter, check_tensor_shapes
from .snapshot import pinned_load
from .model_state import ModelState
from .module_names import matches_any

logger = logging.getLogger(__name__)

WEIGHTS_BASE = "diffusion_pytorch_model"


def parse_device_map(device_map) -> torch.device | None:
    """Accept None, a device/str, or {"": device}; anything finer-grained is refused loudly."""
    if device_map is None:
        return None
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device(device_map)
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return torch.device(device_map[""])
    raise ConfigError(f"device_map={device_map!r}: expected None, a device such as 'cpu' or 'cuda', "
                      "or {'': device}; per-module maps are not supported")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` by ``value`` (keeps its kind)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if
                                                old is not None and value.is_floating_point() else False)
    else:
        module._buffers[attr] = value


def _unshare(model: nn.Module, key: str, buffer: torch.Tensor) -> None:
    """Copy any tensor of ``key``'s module that still views ``buffer`` (the reused read buffer)."""
    owner = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
    ptr = buffer.untyped_storage().data_ptr()
    for name, t in list(owner.named_parameters()) + list(owner.named_buffers()):
        if not t.is_meta and t.device.type == "cpu" and t.untyped_storage().data_ptr() == ptr:
            _set_tensor(owner, name, t.detach().clone())


def _name_file(err: Exception, path, key: str) -> Exception:
    """A backend's error about one stored tensor, with the file and key it came from."""
    text = str(err)
    if str(path) in text:
        return err
    return type(err)(f"{path}: tensor {key!r}: {text}")


def _stored_dtype(model: nn.Module, ckpt: Checkpoint) -> torch.dtype | None:
    """The float dtype of the tensors no backend quantizes (biases, norms) in ``ckpt``; those
    of ``_keep_in_fp32_modules`` are float32 whatever the model's dtype, so they do not count."""
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n, _ in model.named_parameters()} - linear_weights
    for key in ckpt.keys():
        if key in expected and ckpt.dtype(key).is_floating_point \
                and model._target_dtype(key, torch.float16) == torch.float16:
            return ckpt.dtype(key)
    return None


def parse_torch_dtype(value, where: str = "from_pretrained"):
    """``torch_dtype`` as given -> a torch.dtype, None, or "auto" (the checkpoint's own dtype,
    transformers' meaning). diffusers turns anything but a torch.dtype into float32 with a
    warning, so ``torch_dtype="bfloat16"`` loaded float32; here a dtype's name is that dtype and
    anything else is refused by name."""
    if value is None or value == "auto" or (isinstance(value, torch.dtype)
                                            and value.is_floating_point):
        return value
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{where}: torch_dtype={value!r}: expected a floating torch.dtype "
                          "(torch.bfloat16), its name ('bfloat16', 'torch.float16'), 'auto' (the "
                          "checkpoint's own dtype) or None")
    return dtype


class ModelMixin(ModelState):
    """Base of diffquant's models: loading and saving; the quantization state (footprint,
    dequantize, refused casts) comes from ModelState (model_state.py)."""

    config_name = "config.json"
    _keep_in_fp32_modules: list[str] = []
    _no_split_modules: list[str] = []
    _supports_gradient_checkpointing = False

    hf_quantizer = None
    is_quantized = False
    quantization_method = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    @pinned_load  # one tree for the whole load, however a save swaps the path meanwhile
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        use_safetensors: bool | None = None, low_cpu_mem_usage: bool = True,
                        device_map=None, quantization_config=None, **kwargs):
        """Load a model from a diffusers-format directory or hub id.

        Example:
            >>> from diffquant import AutoencoderKL
            >>> vae = AutoencoderKL.from_pretrained("pipe_dir", subfolder="vae")  # doctest: +SKIP
        """
        torch_dtype = parse_torch_dtype(torch_dtype, f"{cls.__name__}.from_pretrained")
        hub_kwargs = split_hub_kwargs(kwargs)
        kwargs.pop("output_loading_info", None)
        directory = resolve_dir(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        config_path = directory / cls.config_name
        from .configuration import read_json

        config = read_json(config_path, what="model config")
        config.update({k: kwargs.pop(k) for k in list(kwargs) if k in config})
        if kwargs:
            logger.warning("from_pretrained: ignoring unknown arguments %s", sorted(kwargs))
        weights = find_weights(directory, WEIGHTS_BASE, variant, use_safetensors)
        quantizer = cls._make_quantizer(config, quantization_config, config_path)
        if quantizer is not None and not low_cpu_mem_usage:
            raise ValueError("low_cpu_mem_usage=False cannot be used with quantization: "
                             "quantized layers are built on the meta device; drop the argument")
        model = cls._build_on_meta(config, config_path, bytes_per_parameter(torch_dtype, quantizer),
                                   parse_device_map(device_map))
        with Checkpoint.open(weights) as ckpt:
            # "auto", or a pre-quantized checkpoint without a dtype: reload in the dtype it was
            # saved in, so save -> load is bit-identical (diffusers picks a backend default
            # such as fp16 for the latter)
            if torch_dtype == "auto" or (torch_dtype is None and quantizer is not None
                                         and quantizer.pre_quantized):
                torch_dtype = _stored_dtype(model, ckpt)
            model._load_quantized(lambda _: ckpt, quantizer, torch_dtype, device_map)
        model.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return model.eval()

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """Load one .gguf/.safetensors file (diffusers or original key names); see single_file.py.

        Example:
            >>> m = FluxTransformer2DModel.from_single_file("flux-Q8_0.gguf",  # doctest: +SKIP
            ...         quantization_config=GGUFQuantizationConfig(torch.bfloat16))
        """
        from .single_file import load_single_file

        return load_single_file(cls, pretrained_model_link_or_path, **kwargs)

    @classmethod
    def _make_quantizer(cls, config: dict, user_config, config_path: Path):
        from .quantizers.auto import DiffusersAutoQuantizer

        on_disk = config.get("quantization_config")
        if on_disk is None and user_config is None:
            return None
        if on_disk is not None:
            if not isinstance(on_disk, dict):
                raise ConfigError(f"{config_path}: key 'quantization_config' should be an object")
            try:
                merged = DiffusersAutoQuantizer.merge_quantization_configs(on_disk, user_config)
                return DiffusersAutoQuantizer.from_config(merged, pre_quantized=True)
            except (ConfigError, QuantizationError, TypeError) as err:  # name the file
                raise ConfigError(f"{config_path}: quantization_config: {err}") from None
        return DiffusersAutoQuantizer.from_config(user_config, pre_quantized=False)

    @classmethod
    def _build_on_meta(cls, config: dict, config_path: Path, per_param: float = 0.5, device=None):
        """The model on meta; a config too large for ``device``'s memory at ``per_param`` bytes
        a parameter, or one ``cls`` cannot take, is refused naming ``config_path``."""
        from .limits import build_within_limits

        init_kwargs = cls.init_kwargs_from_config(config, source=str(config_path))
        try:
            model = build_within_limits(cls, init_kwargs, config_path, per_param, device)
        except DiffquantError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of __init__ is the config's
            raise ConfigError(f"{config_path}: cannot build {cls.__name__} from this config "
                              f"({type(err).__name__}: {err}); check the values' types") from err
        return model

    def _load_quantized(self, checkpoint_for, quantizer, torch_dtype, device_map):
        """The quantizer lifecycle, written once for every loader (from_pretrained,
        from_single_file) on this model, built on meta: the quantizer (None: not quantized)
        checks the environment, settles the dtype and swaps in its layers; the tensors of
        ``checkpoint_for(self)`` (a checkpoint opened once those layers are in place: a single
        file's plan asks them which tensors stay quantized) are streamed in; then
        ``postprocess_model``, and the quantization is recorded on the model. Returns the dtype
        it loaded in."""
        if quantizer is not None:
            quantizer.validate_environment(torch_dtype=torch_dtype, device_map=device_map)
            torch_dtype = quantizer.update_torch_dtype(torch_dtype)
            quantizer.preprocess_model(self, keep_in_fp32_modules=self._keep_in_fp32_modules)
        self._assign_from(checkpoint_for(self), torch_dtype, parse_device_map(device_map),
                          quantizer)
        if quantizer is not None:
            quantizer.postprocess_model(self)
            self.hf_quantizer = quantizer
            self.register_to_config(quantization_config=quantizer.quantization_config,
                                    _pre_quantization_dtype=torch_dtype)
        return torch_dtype

    def _assign_from(self, ckpt: Checkpoint, dtype, device, quantizer) -> None:
        """Stream each checkpoint tensor into the model; error on missing keys and bad shapes."""
        check_tensor_shapes(self, ckpt, quantizer)  # before any read: a header can lie
        expected = dict(self.named_parameters())
        expected.update(self.named_buffers())
        unexpected = []
        # Weights quantized on load are read into one reused buffer (fresh memory page-faults);
        # whatever a backend keeps of it (a view) is copied out below.
        scratch = {} if quantizer is not None and not quantizer.pre_quantized \
            and isinstance(ckpt, Checkpoint) else None
        bar = _load_bar(ckpt)
        for key in ckpt.keys():
            bar.update(_nbytes(ckpt, key))
            if quantizer is not None and quantizer.check_if_quantized_param(self, key, ckpt):
                target = self._target_dtype(key, dtype)
                value = ckpt.tensor(key, scratch) if scratch is not None else ckpt.tensor(key)
                try:
                    quantizer.create_quantized_param(self, key, value, target, device)
                except (CheckpointError, QuantizationError) as err:
                    raise _name_file(err, ckpt.file_of(key), key) from None
                if scratch:
                    _unshare(self, key, scratch["buffer"])
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            old = expected[key]
            shape = ckpt.shape(key)
            if tuple(old.shape) != shape:
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {list(shape)} "
                                      f"but {type(self).__name__} expects {list(old.shape)}")
            value = ckpt.tensor(key)
            if value.is_floating_point():
                value = value.to(self._target_dtype(key, dtype) or old.dtype)
            _set_tensor(self, key, value.to(device) if device is not None else value)
        bar.close()
        self._check_complete(ckpt, unexpected)

    def _target_dtype(self, key: str, dtype):
        if dtype is not None and matches_any(key.rpartition(".")[0], self._keep_in_fp32_modules):
            return torch.float32
        return dtype

    def _check_complete(self, ckpt: Checkpoint, unexpected: list[str]) -> None:
        if unexpected:
            logger.warning("%s: ignoring %d unexpected keys: %s", ckpt.file_of(unexpected[0]),
                           len(unexpected), ", ".join(unexpected[:20]))
        missing = [n for n, t in list(self.named_parameters()) + list(self.named_buffers())
                   if t.is_meta]
        if missing:
            where = ckpt.file_of(ckpt.keys()[0]) if ckpt.keys() else "checkpoint"
            raise CheckpointError(f"{where}: missing {len(missing)} tensors that "
                                  f"{type(self).__name__} needs: {', '.join(missing[:20])}")

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str = "10GB",
                        is_main_process: bool = True, push_to_hub: bool = False,
                        **kwargs) -> None:
        """Write config.json and safetensors weights atomically into ``save_directory``.

        Example:
            >>> model.save_pretrained("out/transformer", max_shard_size="200MB")  # doctest: +SKIP

        ``push_to_hub=True`` then uploads the folder as ``DiffusionPipeline.save_pretrained``.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: diffquant writes only safetensors "
                             "(pickle files can run code when loaded)")
        if self.hf_quantizer is not None and not self.hf_quantizer.is_serializable:
            method = self.hf_quantizer.quantization_config.quant_method
            raise QuantizationError(f"this model is quantized with {getattr(method, 'value', method)} "
                                    f"({self.hf_quantizer.scheme_name()}), which cannot be saved; "
                                    "dequantize() it or load the original checkpoint instead")
        if not is_main_process:
            return
        with atomic_directory(save_directory) as tmp:
            self.write_into(tmp, variant=variant, max_shard_size=max_shard_size)
        push_folder(save_directory, {**kwargs, "push_to_hub": push_to_hub})

    def write_into(self, directory: Path, variant=None, max_shard_size="10GB") -> None:
        """Write config and weights into an existing (fresh) directory, no atomic swap."""
        self.save_config(directory)
        tensors, metadata = self.state_dict(), {}
        if self.hf_quantizer is not None:  # a backend may write its library's layout (torchao)
            tensors, metadata = self.hf_quantizer.get_state_dict_and_metadata(self, tensors)
        write_sharded(tensors, self._tensor_groups(tensors), Path(directory), WEIGHTS_BASE,
                      variant, max_shard_size, metadata=metadata)

    def _tensor_groups(self, tensors: dict) -> list[list[str]]:
        """Keys grouped by their owning module, so a quantized weight's pieces share a shard.

        A quantized layer's submodules (modelopt's ``weight_quantizer``) join the layer's group.
        """
        from .quantizers.base import QuantizedLinear  # lazy: the quantizers build on this module

        named = dict(self.named_modules())
        layers = {name for name, m in named.items() if isinstance(m, QuantizedLinear)}
        groups: dict[str, list[str]] = {}
        for key in tensors:
            owner = key
            while owner and owner not in named:
                owner = owner.rpartition(".")[0]
            outer, probe = owner, owner
            while probe:
                outer = probe if probe in layers else outer
                probe = probe.rpartition(".")[0]
            groups.setdefault(outer, []).append(key)
        return list(groups.values())


def _nbytes(ckpt, key: str) -> int:
    """``key``'s bytes in ``ckpt``; 0 for a source that does not say (a single file's plan)."""
    if not (hasattr(ckpt, "shape") and hasattr(ckpt, "dtype")):
        return 0
    n = 1
    for d in ckpt.shape(key):
        n *= d
    return n * ckpt.dtype(key).itemsize


def _load_bar(ckpt):
    """One tqdm bar over the bytes of the whole checkpoint (every file), so a 24 GB load is not
    silent. Shown once a load takes over a second (a small model's stays quiet); TQDM_DISABLE=1
    (the CLI's --quiet) silences it, as every other bar of the project."""
    from tqdm.auto import tqdm

    total = sum(_nbytes(ckpt, key) for key in ckpt.keys())
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Loading weights",
                delay=1.0, leave=False, **({"disable": True} if not total else {}))
