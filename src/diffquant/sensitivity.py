"""How much each linear layer of a model suffers from each quantization format: one forward per
layer and format, with that layer alone quantized, and the error of the model's output against
the unquantized model's (the measure a memory planner spends bits by).

The error is the relative mean squared error, ``mean((y - y0)^2) / mean(y0^2)``, in float64;
None where the format cannot hold the layer (its width is not a multiple of the format's
block). Each layer is quantized by its backend exactly as ``from_pretrained`` quantizes it, so
the numbers are those of the real layers. With ``ray`` the layers run as Ray tasks, a layer to
a task, over the model put once in Ray's object store.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    >>> errors = layer_sensitivity(model, {"input": torch.randn(4, 64)},
    ...                            ["torchao:int8wo", "gguf:q4_0"], progress=False)
    >>> sorted(errors), sorted(errors["0"])
    (['0', '2'], ['gguf:q4_0', 'torchao:int8wo'])
    >>> errors["0"]["gguf:q4_0"] > errors["0"]["torchao:int8wo"] > 0
    True
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from .errors import ConfigError
from .quantizers import DiffusersAutoQuantizer
from .spec import diffquant_config, parse_spec


def quantize_linear(linear: nn.Linear, spec: str) -> nn.Module | None:
    """``linear`` quantized as ``spec`` ("backend:scheme") the way from_pretrained does it,
    computing in the layer's dtype; None where the backend leaves such a layer unquantized."""
    dtype = linear.weight.dtype
    config = diffquant_config(parse_spec(spec))
    for field in ("compute_dtype", "bnb_4bit_compute_dtype"):  # as the layer computes now
        if hasattr(config, field):
            setattr(config, field, dtype)
    quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
    quantizer.update_torch_dtype(dtype)
    with torch.device("meta"):
        holder = nn.Sequential(nn.Linear(linear.in_features, linear.out_features,
                                         bias=linear.bias is not None))
    quantizer.preprocess_model(holder)
    if type(holder[0]) is nn.Linear:
        return None
    quantizer.create_quantized_param(holder, "0.weight", linear.weight.detach(), dtype, None)
    wanted, stored = getattr(config, "quant_type", None), getattr(holder[0], "qtype", None)
    if stored is not None and str(getattr(stored, "name", stored)).upper() != str(wanted).upper():
        return None  # GGUF keeps a layer its blocks do not divide in float (quantizers/gguf.py)
    if linear.bias is not None:
        holder[0].bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    quantizer.postprocess_model(holder)
    return holder[0].to(linear.weight.device).eval()


def _first_tensor(output) -> torch.Tensor:
    """A model's main output: a tensor, the first of a tuple, or an output's first field."""
    while not isinstance(output, torch.Tensor):
        output = output[0]
    return output


def relative_error(y: torch.Tensor, y0: torch.Tensor) -> float:
    """mean((y - y0)^2) / mean(y0^2), in float64."""
    y, y0 = y.double(), y0.double()
    return float(((y - y0) ** 2).mean() / (y0 ** 2).mean().clamp_min(1e-300))


def linear_layers(model: nn.Module, patterns=None) -> list[str]:
    """Names of ``model``'s nn.Linear layers, those matching a glob of ``patterns`` if given."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def measure_layers(model: nn.Module, inputs: dict, reference: torch.Tensor, layers: list[str],
                   formats: list[str]) -> dict[str, dict[str, float | None]]:
    """{layer: {format: error}} for ``layers``, each quantized alone, the model restored after."""
    result = {}
    for name in layers:
        original = model.get_submodule(name)
        result[name] = {}
        for spec in formats:
            layer = quantize_linear(original, spec)
            if layer is None:
                result[name][spec] = None
                continue
            _set(model, name, layer)
            try:
                result[name][spec] = relative_error(_first_tensor(model(**inputs)), reference)
            finally:
                _set(model, name, original)
    return result


def check_formats(formats) -> list[str]:
    formats = list(formats)
    if not formats:
        raise ConfigError("sensitivity: no formats; give SPECs such as 'gguf:q4_k', 'gguf:q6_k'")
    for spec in formats:
        if "@" in spec:
            raise ConfigError(f"sensitivity: format {spec!r} names components; give "
                              "'backend:scheme' only (the layers are the model's)")
        parse_spec(spec)  # an unknown one is answered with every backend and scheme
    return formats


def layer_sensitivity(model: nn.Module, inputs: dict, formats, *, layers=None, ray=None,
                      ray_cpus_per_task: float = 1, ray_gpus_per_task: float = 0,
                      progress: bool = True) -> dict[str, dict[str, float | None]]:
    """{layer: {format: error}} of every nn.Linear of ``model`` (or those matching the globs
    of ``layers``) for each ``formats`` SPEC ("gguf:q4_k"), on ``model(**inputs)``.

    ``ray``: None measures here; "" on a local Ray cluster (or RAY_ADDRESS); else the
    cluster's address (Ray tasks of ``ray_cpus_per_task``/``ray_gpus_per_task`` each)."""
    from tqdm.auto import tqdm

    formats = check_formats(formats)
    if ray is not None:
        from .batch.cluster import require_ray

        require_ray()  # before the first forward: say which extra to install
    names = linear_layers(model, layers)
    if not names:
        raise ConfigError(f"sensitivity: no nn.Linear layer matches {list(layers or ['*'])}; "
                          f"the model has {', '.join(linear_layers(model)[:5]) or 'none'} ...")
    model.eval()
    with torch.no_grad():
        reference = _first_tensor(model(**inputs))
    bar = tqdm(total=len(names), unit="layer", desc="sensitivity", disable=not progress)
    try:
        if ray is None:
            result = {}
            for name in names:
                result.update(measure_layers(model, inputs, reference, [name], formats))
                bar.update(1)
            return result
        return _on_ray(model, inputs, reference, names, formats, ray, ray_cpus_per_task,
                       ray_gpus_per_task, bar)
    finally:
        bar.close()


def _on_ray(model, inputs, reference, names, formats, address, cpus, gpus, bar) -> dict:
    from .batch.cluster import ray_session

    with ray_session("" if address is True else address) as ray:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus or None)(measure_layers)
        shared = [ray.put(x) for x in (model, inputs, reference)]  # once, not per task
        pending = {task.remote(*shared, [name], formats): name for name in names}
        result = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            result.update(ray.get(ready[0]))
            del pending[ready[0]]
            bar.update(1)
        return {name: result[name] for name in names}  # in the model's order


def capture_inputs(pipe, component: str = "transformer", **call_kwargs) -> dict:
    """The keyword inputs of ``pipe``'s first call of ``component`` during ``pipe(**call_kwargs)``
    (the pipeline stops there), as ``layer_sensitivity`` takes them."""
    import inspect

    module = getattr(pipe, component, None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"sensitivity: the pipeline has no model component {component!r}")
    captured = {}

    class _Stop(Exception):
        pass

    def hook(mod, args, kwargs):
        bound = inspect.signature(mod.forward).bind(*args, **kwargs)
        captured.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                         for k, v in bound.arguments.items()})
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call_kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ConfigError(f"sensitivity: the pipeline never called {component!r}")
    return captured
