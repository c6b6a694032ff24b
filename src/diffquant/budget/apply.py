"""Write a plan: the pipeline quantized as the planner chose, saved pre-quantized, with the plan
beside it (``budget_plan.json``) so ``generate`` runs it under the budget it was made for.

A component's base scheme is applied while loading (PipelineQuantizationConfig, the loader's
own quantize-on-load); the layers the plan moves up are then quantized again from the source's
full-precision weights to their type (GGUF keeps each layer's type beside its blocks, so a
mixed transformer reloads as it was written).

Example:
    >>> plan = plan_pipeline("flux/", "8GB")                      # doctest: +SKIP
    >>> write_plan("flux/", "flux-8gb/", plan)                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .planner import Plan

PLAN_FILE = "budget_plan.json"


def quantization_config(src, plan: Plan):
    """The PipelineQuantizationConfig of the plan's base schemes (None: nothing to quantize)."""
    from ..spec import build_quantization_config, parse_spec

    index = json.loads((Path(src) / "model_index.json").read_text())
    specs = [parse_spec(f"{base}@{name}") for name, (base, _) in plan.schemes().items()
             if base not in ("float", "as saved")]
    return build_quantization_config(specs, index) if specs else None


def upgrade_layers(model: torch.nn.Module, folder: Path, types: dict[str, str]) -> None:
    """Requantize ``model``'s GGUF layers named in ``types`` ({layer: "Q6_K"}) from the
    full-precision weights in ``folder``."""
    from safetensors import safe_open

    from ..errors import ConfigError
    from ..quantizers.gguf import GGUFLinear

    left = dict(types)
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                layer = key[:-len(".weight")]
                if not key.endswith(".weight") or layer not in left:
                    continue
                module = model.get_submodule(layer)
                if not isinstance(module, GGUFLinear):
                    raise ConfigError(f"plan: layer {layer!r} of {folder} is a "
                                      f"{type(module).__name__}, not a GGUF layer")
                module.quant_type = left.pop(layer)
                weight = f.get_tensor(key)
                module.load_piece("weight", weight, pre_quantized=False, dtype=weight.dtype,
                                  device=None)
    if left:
        raise ConfigError(f"plan: {folder} has no weights for layers {sorted(left)[:5]}")


def write_plan(src, dst, plan: Plan, torch_dtype=None) -> None:
    """Quantize pipeline folder ``src`` as ``plan`` says and save it to ``dst``, one phase
    component at a time (T5-XXL and the transformer together would not fit the memory the plan
    is for). A component kept float in the dtype it is stored in is hard-linked, not rewritten.
    ``budget_plan.json`` is written last: a folder without it is incomplete."""
    from ..pipeline import INDEX_NAME, DiffusionPipeline, save_pipeline
    from ..pipeline_components import component_dtype, resolve_class, resolve_quant_configs
    from .residency import phase_of

    src, dst = Path(src), Path(dst)
    qconfig = quantization_config(src, plan)
    index = json.loads((src / INDEX_NAME).read_text())
    heavy = [n for n, e in index.items() if phase_of(n) is not None and isinstance(e, list)
             and e[0] is not None]
    skip = {n: None for n in heavy}
    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch_dtype,
                                             quantization_config=qconfig, **skip)
    (dst / PLAN_FILE).unlink(missing_ok=True)
    for name in heavy:  # an earlier write's: the save below would carry them over
        shutil.rmtree(dst / name, ignore_errors=True)
    save_pipeline(type(pipe).__name__, pipe.components, dst)  # the light ones, atomically
    del pipe
    schemes = plan.schemes()
    for name in heavy:
        dtype = component_dtype(torch_dtype, name)
        base, ups = schemes.get(name, ["float", {}])
        if base in ("float", "as saved") and not ups and _stored_as(src / name, dtype):
            _link_tree(src / name, dst / name)
        else:
            _write_component(src, dst, name, index[name], qconfig, dtype, ups,
                             resolve_class, resolve_quant_configs)
    written = json.loads((dst / INDEX_NAME).read_text())
    (dst / INDEX_NAME).write_text(json.dumps(written | {n: index[n] for n in heavy}, indent=2,
                                             sort_keys=True) + "\n")
    (dst / PLAN_FILE).write_text(plan.to_json() + "\n")


def _write_component(src, dst, name, entry, qconfig, dtype, ups, resolve_class,
                     resolve_quant_configs) -> None:
    from ..pipeline import INDEX_NAME
    from ..pipeline_components import load_component, save_component
    from .memory import release_memory

    cls = resolve_class(src / INDEX_NAME, name, entry)
    kw = dict(torch_dtype=dtype, variant=None, use_safetensors=None, device_map=None,
              low_cpu_mem_usage=True, quant_configs=resolve_quant_configs(qconfig, {name: cls}))
    module = load_component(src, src / INDEX_NAME, name, cls, kw)
    if ups:
        upgrade_layers(module, src / name, ups)
    save_component(module, dst / name, None, None)
    del module
    release_memory()


def _stored_as(folder: Path, dtype) -> bool:
    """Every float tensor of ``folder`` is stored in ``dtype`` (None: as stored, so always)."""
    from .memory import tensor_table

    if dtype is None:
        return True
    want = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(dtype)
    return all(kind == want for kind, _ in tensor_table(folder).values()
               if kind in ("BF16", "F16", "F32", "F64"))


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` as hard links (a copy where the file system has none)."""
    import os

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def saved_plan(folder) -> Plan | None:
    """The plan written beside a pipeline folder by write_plan, or None."""
    path = Path(folder) / PLAN_FILE
    return Plan.from_json(path.read_text()) if path.is_file() else None
