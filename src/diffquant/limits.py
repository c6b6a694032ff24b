"""Bounded work on untrusted files: JSON parsed with size and depth limits, and a model's size
checked against the memory there is before anything is allocated.

A config.json is data someone else wrote. ``num_layers=1000000`` builds for an hour on the meta
device and then asks for terabytes; ``[[[[...]]]]`` ten thousand deep raises RecursionError
inside ``json``; a 5000-digit integer raises a ValueError that names no file. Here each is a
ConfigError (or the caller's error class) naming the file, and the size check names the
parameter count and the memory it would take.

Example:
    >>> parse_json(b'{"a": [1, 2]}', "config.json")
    {'a': [1, 2]}
    >>> parse_json(b"[" * 100 + b"]" * 100, "config.json")
    Traceback (most recent call last):
    ...
    diffquant.errors.ConfigError: config.json: JSON nested deeper than 64 levels; the file is corrupt or not a config
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading

import torch
from torch import nn

from .errors import ConfigError, DiffquantError

MAX_JSON_DEPTH = 64         # diffusers' configs nest 3 deep; safetensors headers 3
MAX_JSON_BYTES = 64 << 20   # a config or index file; Flux's index is ~100 KB
MAX_INT_DIGITS = 40         # a u128 has 39; larger is not a size, a count or an offset
# Meta-device builds cost ~0.5 ms a module; Flux-dev has 1273 modules, the largest diffusers
# models a few thousand. Past MAX_MODULES a config describes nothing anyone can load.
MAX_MODULES = 20000
FIRST_CAP = 2000            # past this, a model is sized by extrapolation before it is built


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS} are read)")
    return int(text)


class BadJSON(ValueError):
    """parse_json's error class for callers that word the message themselves."""


def unique_keys(pairs):
    """json's object_pairs_hook: a name twice in one object is refused (json keeps the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise BadJSON(f"the name {key!r} appears twice")
        out[key] = value
    return out


def is_count(value) -> bool:
    """A size, dimension or offset as binary formats store them: an int in [0, 2**64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def file_identity(fh) -> tuple:
    """What tells an open file from another one put at its path later."""
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (iterative: safe on any depth)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def parse_json(data: bytes | str, source, error=ConfigError, pairs_hook=None, allow_nan=True,
               max_bytes: int = MAX_JSON_BYTES):
    """``json.loads`` with limits; every failure is ``error`` naming ``source``.

    ``pairs_hook`` is json's ``object_pairs_hook`` (to refuse duplicate keys, say);
    ``allow_nan=False`` refuses NaN and Infinity, which strict JSON readers do.
    """
    if len(data) > max_bytes:
        raise error(f"{source}: {len(data)} bytes of JSON; more than {max_bytes >> 20} MiB is "
                    "not read")

    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_int=_bounded_int, object_pairs_hook=pairs_hook,
                           parse_constant=None if allow_nan else no_constant)
    except UnicodeDecodeError as err:
        raise error(f"{source}: not UTF-8 text ({err})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deep to read; expected at most "
                    f"{MAX_JSON_DEPTH} levels") from None
    except DiffquantError:
        raise
    except ValueError as err:  # JSONDecodeError, huge integers, refused constants, hooks
        raise error(f"{source}: not valid JSON ({err})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels; the file is "
                    "corrupt or not a config")
    return value


def read_bounded(path, error=ConfigError) -> bytes:
    """A config-sized file's bytes; a larger one is refused before it is read."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes; a config or index file of more than "
                        f"{MAX_JSON_BYTES >> 20} MiB is not read")
        return fh.read(MAX_JSON_BYTES + 1)


# -- a model's size before it is built ---------------------------------------------------------
class _TooManyModules(Exception):
    pass


class _Counter:
    """Counts the modules and parameter elements this thread registers while building a model;
    raises once there are more modules than ``cap`` (hooks are global: other threads pass)."""

    def __init__(self, cap: int):
        self.cap, self.modules, self.elements = cap, 0, 0
        self.thread = threading.get_ident()

    def on_module(self, module, name, submodule):
        if threading.get_ident() == self.thread:
            self.modules += 1
            if self.modules > self.cap:
                raise _TooManyModules

    def on_tensor(self, module, name, tensor):
        if threading.get_ident() == self.thread and tensor is not None:
            self.elements += tensor.numel()

    def build(self, cls, kwargs: dict):
        from torch.nn.modules import module as m

        handles = [m.register_module_module_registration_hook(self.on_module),
                   m.register_module_parameter_registration_hook(self.on_tensor),
                   m.register_module_buffer_registration_hook(self.on_tensor)]
        try:
            with torch.device("meta"), _no_init(self.thread):
                return cls(**kwargs)
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def _no_init(thread: int):
    """Skip torch.nn.init's fills in ``thread``: on meta they fill nothing and cost ~1 ms a
    layer (transformers' ``no_init_weights`` does the same); other threads keep them."""
    originals = {name: fn for name, fn in vars(nn.init).items()
                 if name.endswith("_") and not name.startswith("_") and callable(fn)}

    def skip(original):
        def fill(tensor, *args, **kwargs):
            if threading.get_ident() == thread:
                return tensor
            return original(tensor, *args, **kwargs)
        return fill

    for name, fn in originals.items():
        setattr(nn.init, name, skip(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


def _probe(cls, kwargs: dict) -> tuple[int, int] | None:
    """(modules, parameter elements) of ``cls(**kwargs)`` on meta; None where it cannot be
    built within ``FIRST_CAP`` modules."""
    counter = _Counter(FIRST_CAP)
    try:
        model = counter.build(cls, kwargs)
    except Exception:  # noqa: BLE001 - a probe that fails says nothing; the caller reports
        return None
    return counter.modules, _elements(model)


def _extrapolate(cls, kwargs: dict) -> tuple[str, int, int] | None:
    """(field, modules, parameter elements) estimated for the integer field that makes the
    model large: its cost at 1 and at 2 gives the cost of each further unit (a count of
    layers or blocks adds the same each time)."""
    fields = sorted(((v, k) for k, v in kwargs.items()
                     if isinstance(v, int) and not isinstance(v, bool) and v > 2), reverse=True)
    for value, field in fields:
        one, two = _probe(cls, {**kwargs, field: 1}), _probe(cls, {**kwargs, field: 2})
        if one is not None and two is not None and two[0] > one[0]:
            return (field, *(a + (value - 1) * (b - a) for a, b in zip(one, two)))
    return None


def _elements(model: nn.Module) -> int:
    return sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))


def available_memory(device: torch.device | None) -> int | None:
    """Bytes a load may still take on ``device`` (host: MemAvailable + free swap, and what
    RLIMIT_AS leaves); None where unknown."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device is not None and device.type not in ("cpu", "meta"):
        return None
    free = None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
        free = sum(int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree") if k in info)
    except (OSError, ValueError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:
            used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            used = 0
        free = min(free if free is not None else soft, max(soft - used, 0))
    return free


def bytes_per_parameter(torch_dtype, quantizer) -> float:
    """A lower bound of the bytes one parameter takes once loaded: the quantized width where a
    backend quantizes, the dtype's otherwise ('auto' and unknown: 2 bytes)."""
    if quantizer is not None:
        bits = getattr(quantizer.quantization_config, "bits", 0)
        return bits / 8 if isinstance(bits, int) and bits > 0 else 0.5
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype.itemsize
    return 4.0 if torch_dtype is None else 2.0


def build_within_limits(cls, kwargs: dict, source, per_param: float = 0.5,
                        device: torch.device | None = None) -> nn.Module:
    """``cls(**kwargs)`` on the meta device, refused by name when it has more modules than
    anyone builds or more parameters than ``device``'s memory holds at ``per_param`` bytes.

    A model of more than ``FIRST_CAP`` modules is first sized from two small builds (its
    largest count field at 1 and at 2), so a config of a million layers is refused in about a
    second instead of built for an hour.
    """
    free = None if os.environ.get("DIFFQUANT_SKIP_MEMORY_CHECK") else available_memory(device)
    counter = _Counter(FIRST_CAP)
    try:
        return _check_fits(counter.build(cls, kwargs), cls, source, per_param, free)
    except _TooManyModules:
        pass
    guess = _extrapolate(cls, kwargs)
    if guess is None or guess[1] > MAX_MODULES:
        what = (f"~{guess[1]:,} modules and ~{guess[2]:,} parameters ({guess[0]}="
                f"{kwargs[guess[0]]:,}), which need at least {_gib(guess[2] * per_param)}"
                if guess else f"more than {FIRST_CAP:,} modules "
                "(and none of its integer fields alone makes it so)")
        raise ConfigError(f"{source}: {cls.__name__} from this config would have {what}; "
                          f"diffquant builds models of at most {MAX_MODULES:,} modules: check "
                          "the config's values")
    if free is not None and guess[2] * per_param > free:
        raise ConfigError(_too_big(cls, source, guess[2], per_param, free))
    try:
        return _check_fits(_Counter(MAX_MODULES).build(cls, kwargs), cls, source, per_param, free)
    except _TooManyModules:
        raise ConfigError(f"{source}: {cls.__name__} from this config would have more than "
                          f"{MAX_MODULES:,} modules; check the config's values") from None


def check_fits(model: nn.Module, source, per_param: float = 0.5,
               device: torch.device | None = None) -> nn.Module:
    """``model`` (built on meta by other code: diffusers' from_config) if its parameters fit
    ``device``'s memory at ``per_param`` bytes each, else a ConfigError naming ``source``."""
    free = None if os.environ.get("DIFFQUANT_SKIP_MEMORY_CHECK") else available_memory(device)
    return _check_fits(model, type(model), source, per_param, free)


def _check_fits(model: nn.Module, cls, source, per_param: float, free: int | None) -> nn.Module:
    count = _elements(model)
    if free is not None and count * per_param > free:
        raise ConfigError(_too_big(cls, source, count, per_param, free))
    return model


def _too_big(cls, source, count: int, per_param: float, free: int) -> str:
    return (f"{source}: {cls.__name__} from this config has {count:,} parameters, which need "
            f"at least {_gib(count * per_param)} but {_gib(free)} of memory is available; "
            "check the config's values (or set DIFFQUANT_SKIP_MEMORY_CHECK=1 to load anyway)")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


# -- every tensor's shape against the model, before any data is read ------------------------
def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_tensor_shapes(model: nn.Module, ckpt, quantizer) -> None:
    """Refuse, naming the file and the key, a checkpoint tensor that does not fit ``model``,
    before a byte of data is read: a weight quantized on load must be the layer's [out, in]
    (every backend), a stored piece of a quantized layer can be no larger than the layer's
    weight in float32 (a header claiming gigabytes for a small layer is refused here, not
    after the allocation), any other tensor must have its parameter's shape."""
    from .errors import CheckpointError
    from .quantizers.base import QuantizedLinear

    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key in ckpt.keys():
        shape = tuple(ckpt.shape(key))
        module, rel = quantizer._layer_of(model, key) if quantizer is not None else (None, key)
        if isinstance(module, QuantizedLinear) and quantizer.check_if_quantized_param(model, key,
                                                                                     ckpt):
            want = (module.out_features, module.in_features)
            if not quantizer.pre_quantized and rel == "weight" and shape != want:
                layer = key[:-len(".weight")]
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {list(shape)}"
                                      f" but {type(model).__name__}'s layer {layer!r} is "
                                      f"{list(want)} (out_features, in_features)")
            limit = 4 * want[0] * want[1] + 65536  # bytes: the weight in float32, or a small blob
            size = _numel(shape) * _itemsize(ckpt, key)
            if size > limit:
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} claims {list(shape)} "
                                      f"({size:,} bytes) for a layer of {list(want)}; the file "
                                      "does not match this model")
        elif key in expected and shape != tuple(expected[key].shape):
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has shape {list(shape)} "
                                  f"but {type(model).__name__} expects "
                                  f"{list(expected[key].shape)}")


def _itemsize(ckpt, key) -> int:
    dtype = getattr(ckpt, "dtype", None)
    return dtype(key).itemsize if dtype is not None else 1
