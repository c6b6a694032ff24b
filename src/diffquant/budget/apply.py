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
    """Quantize pipeline folder ``src`` as ``plan`` says and save it to ``dst``."""
    from ..pipeline import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch_dtype,
                                             quantization_config=quantization_config(src, plan))
    for name, (_, ups) in plan.schemes().items():
        if ups:
            upgrade_layers(getattr(pipe, name), Path(src) / name, ups)
    pipe.save_pretrained(dst)
    (Path(dst) / PLAN_FILE).write_text(plan.to_json() + "\n")


def saved_plan(folder) -> Plan | None:
    """The plan written beside a pipeline folder by write_plan, or None."""
    path = Path(folder) / PLAN_FILE
    return Plan.from_json(path.read_text()) if path.is_file() else None
