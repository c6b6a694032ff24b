"""The planner: the best quality that fits a memory budget, component by component.

Under a budget only one phase's components are resident at a time (residency.py), so each
phase must fit alone: baseline (this process before loading) + the VAE (always resident) +
the phase's components + its activations. For each component the planner walks its ladder of
schemes, best first (the transformer: float, then GGUF Q8_0, Q6_K, Q5_K, Q4_K; T5: float,
then torchao int8 weight-only), and takes the first that fits. Where the budget falls between
two rungs, the transformer's layers are mixed: the rung below for all, then the layers that
lose the most error per byte moved up, one by one, while the phase fits (Q6_K for the most
sensitive layers and Q4_K for the rest, say).

Sizes are the formats' own byte counts (a GGUF type's block bytes; int8's byte and scale per
row), from the checkpoint's headers and the model's layer shapes, nothing loaded. A layer's
error is from ``diffquant sensitivity``'s JSON where given (the relative error of the
component's output with that layer alone quantized), else measured on the weight itself: the
relative squared error of a sample of its rows quantized and dequantized by the format's own
functions. A component's expected error is the sum over its layers.

Example:
    >>> from diffquant.budget.planner import plan_pipeline
    >>> plan = plan_pipeline("FLUX.1-dev/", "16GB", height=512, width=512)   # doctest: +SKIP
    >>> print(plan.table())                                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from . import memory
from .memory import gb

GGUF_LADDER = ["Q8_0", "Q6_K", "Q5_K", "Q4_K"]
# Below Q4_K (4.5 bits a weight), whole: torchao int4 weight-only, 4.25 bits with a bf16 scale
# and zero per 128 columns (GGUF's smaller K-quants, Q3_K and Q2_K, have no quantizer here).
# FLUX.1-dev's transformer in Q4_K is 6.7 GB, over what an 8 GB budget leaves; in int4, 6.3 GB.
INT4_GROUP = 128
MARGIN = 0.05  # of the budget left unplanned: the estimates' error, the allocator's slack
ROWS_SAMPLED = 32  # rows of each weight quantized to measure its error


@dataclass
class Choice:
    """One row of a plan: ``layers`` of ``component`` (all of them where empty) in ``scheme``."""

    component: str
    scheme: str          # "float", "gguf:q4_k", "torchao:int8wo"
    nbytes: int
    error: float | None
    layers: list = field(default_factory=list)
    group: str = "all"


@dataclass
class Plan:
    """What a budget run holds: the choices, each phase's predicted bytes, the VAE tile."""

    budget: int
    baseline: int
    dtype: str
    choices: list
    phases: dict         # phase -> predicted bytes above the baseline
    vae_tile: int | None
    run: dict            # height, width, max_sequence_length, batch the plan was made for

    @property
    def peak(self) -> int:
        return self.baseline + max(self.phases.values())

    def table(self) -> str:
        rows = ["| component | layers | scheme | GB | expected error |", "|---|---|---|---|---|"]
        for c in self.choices:
            err = "-" if c.error is None else f"{c.error:.3g}"
            rows.append(f"| {c.component} | {c.group} | {c.scheme} | {c.nbytes / 1e9:.3f} | {err} |")
        phases = ", ".join(f"{k} {gb(v)}" for k, v in self.phases.items())
        tile = f"tiles of {self.vae_tile} px" if self.vae_tile else "whole"
        return "\n".join(rows + [
            "", f"phases above the baseline: {phases}; VAE decode {tile}",
            f"predicted peak: {gb(self.peak)} (baseline {gb(self.baseline)}) of max_memory "
            f"{gb(self.budget)}"])

    def schemes(self) -> dict:
        """{component: [base scheme, {layer: GGUF type of each layer moved up}]}."""
        out = {}
        for c in self.choices:
            entry = out.setdefault(c.component, [None, {}])
            if c.layers:  # moved up: a GGUF type, or the float type GGUF keeps as it is
                kind = {"float32": "F32", "float16": "F16"}.get(self.dtype, "BF16") \
                    if c.scheme == "float" else c.scheme.split(":")[1].upper()
                entry[1].update({name: kind for name in c.layers})
            else:
                entry[0] = c.scheme
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"peak": self.peak}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        data.pop("peak", None)
        data["choices"] = [Choice(**c) for c in data["choices"]]
        return cls(**data)


# -- sizes and errors of one layer per scheme -----------------------------------------------------
def layer_bytes(shape: tuple, scheme: str, itemsize: int) -> int:
    """Bytes of an [N, K] linear weight stored as ``scheme`` (float: ``itemsize`` per value;
    a GGUF type whose block does not divide K stays float, as the loader keeps it)."""
    n, k = shape
    if scheme == "float":
        return n * k * itemsize
    backend, name = scheme.split(":")
    if name == "int4wo":   # two weights a byte, a scale and a zero per group (float if K is not)
        return n * k * itemsize if k % INT4_GROUP else n * k // 2 + 2 * n * (k // INT4_GROUP) \
            * itemsize
    if backend == "torchao":   # int8 weight-only: a byte per weight, a scale per row
        return n * k + n * itemsize
    from ..ops.formats.gguf import BLOCK_LAYOUT, ggml_type

    block, size = BLOCK_LAYOUT[ggml_type(name.upper())]
    return n * k * itemsize if k % block else n * (k // block) * size


def weight_error(weight: torch.Tensor, scheme: str) -> float | None:
    """Relative squared error of ``weight`` [rows, K] stored as ``scheme``, dequantized."""
    w = weight.float()
    if scheme == "float":
        return 0.0
    backend, name = scheme.split(":")
    if name == "int4wo":
        from ..ops.formats.torchao import int4_dequantize, int4_quantize_groupwise

        if w.shape[1] % INT4_GROUP:
            return 0.0  # stays float
        q = int4_dequantize(*int4_quantize_groupwise(weight, INT4_GROUP), torch.float32)
    elif backend == "torchao":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        q = (w / scale).round().clamp(-128, 127) * scale
    else:
        from ..ops.formats.gguf import BLOCK_LAYOUT, dequantize, ggml_type, quantize

        qtype = ggml_type(name.upper())
        if w.shape[1] % BLOCK_LAYOUT[qtype][0]:
            return 0.0  # stays float
        q = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
    return float(((q - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))


def _linear_names(folder: Path, cls) -> set[str] | None:
    """Names of ``cls``'s nn.Linear layers built from folder/config.json on the meta device."""
    if cls is None or not hasattr(cls, "from_config"):
        return None
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception:  # noqa: BLE001 - a class we cannot build: every 2-D weight counts
        return None
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}


# -- the pipeline's components ---------------------------------------------------------------------
@dataclass
class _Component:
    name: str
    folder: Path
    ladder: list                  # schemes best first; ["as saved"] for a pre-quantized one
    linear: dict                  # layer name -> [N, K] of each quantizable weight
    other: int                    # bytes of everything else, loaded
    largest: int                  # the largest tensor's bytes (the load's transient)
    measured: dict = field(default_factory=dict)  # layer -> {scheme: error} given
    errors: dict = field(default_factory=dict)    # (layer, scheme) -> error, found when asked
    files: dict = field(default_factory=dict)     # layer -> its safetensors file

    def layer_error(self, layer: str, scheme: str) -> float | None:
        """The error of ``layer`` in ``scheme``: given (sensitivity), else measured on
        ROWS_SAMPLED rows of its weight, once."""
        if (layer, scheme) not in self.errors:
            given = self.measured.get(layer, {})
            if scheme == "float":
                value = 0.0
            elif scheme in given:
                value = given[scheme]
            else:
                from safetensors import safe_open

                with safe_open(str(self.files[layer]), framework="pt") as f:
                    rows = f.get_slice(layer + ".weight")[:ROWS_SAMPLED]        # [rows, K]
                value = weight_error(rows, scheme)
            self.errors[(layer, scheme)] = value
        return self.errors[(layer, scheme)]

    def nbytes(self, scheme: str, itemsize: int, layers=None) -> int:
        names = self.linear if layers is None else layers
        return sum(layer_bytes(self.linear[n], scheme, itemsize) for n in names)

    def total(self, scheme: str, itemsize: int) -> int:
        return self.other + self.nbytes(scheme, itemsize)

    def error(self, scheme: str, layers=None) -> float | None:
        names = self.linear if layers is None else layers
        values = [self.layer_error(n, scheme) for n in names]
        return None if any(v is None for v in values) else float(sum(values))


def _ladder(name: str, entry, config: dict) -> list[str]:
    if config.get("quantization_config"):
        return ["as saved"]
    if name == "transformer" and entry[0] == "diffusers":
        return ["float"] + [f"gguf:{t.lower()}" for t in GGUF_LADDER] + ["torchao:int4wo"]
    if name == "text_encoder_2" and entry[0] == "transformers":
        return ["float", "torchao:int8wo"]
    return ["float"]


def _component(root: Path, name: str, entry, dtype: torch.dtype, sensitivity: dict | None):
    from ..pipeline_components import resolve_class

    folder = root / name
    config = json.loads((folder / "config.json").read_text())
    ladder = _ladder(name, entry, config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total, largest = memory.loaded_bytes(folder, dtype)
    linear = {}
    if ladder[0] == "float" and len(ladder) > 1:
        cls = resolve_class(root / "model_index.json", name, entry)
        names = _linear_names(folder, cls)
        for key, (kind, shape) in memory.tensor_table(folder).items():
            layer = key[:-len(".weight")]
            if key.endswith(".weight") and len(shape) == 2 and kind in ("F32", "F16", "BF16") \
                    and (names is None or layer in names):
                linear[layer] = shape
    comp = _Component(name, folder, ladder, linear, 0, largest,
                      measured=(sensitivity or {}).get(name) or {})
    comp.other = total - comp.nbytes("float", itemsize)
    for path in sorted(folder.glob("*.safetensors")):
        for key in memory.tensor_table_of(path):
            if key.endswith(".weight") and key[:-len(".weight")] in linear:
                comp.files[key[:-len(".weight")]] = path
    return comp


# -- the plan ----------------------------------------------------------------------------------
def _mix(comp: _Component, high: str, low: str, itemsize: int, room: int) -> tuple[list, int]:
    """Layers to move from ``low`` up to ``high`` within ``room`` bytes, the most error saved
    per byte first; returns (layers, bytes they add)."""
    gains = []
    for name in comp.linear:
        extra = comp.nbytes(high, itemsize, [name]) - comp.nbytes(low, itemsize, [name])
        saved = (comp.layer_error(name, low) or 0.0) - (comp.layer_error(name, high) or 0.0)
        if extra > 0 and saved > 0:
            gains.append((saved / extra, name, extra))
    chosen, used = [], 0
    for _, name, extra in sorted(gains, reverse=True):
        if used + extra <= room:
            chosen.append(name)
            used += extra
    return chosen, used


def _choose(comp: _Component, room: int, itemsize: int) -> list[Choice] | None:
    """The best choices of ``comp`` within ``room`` bytes, None if even its last rung is over."""
    if comp.ladder == ["as saved"] or comp.ladder == ["float"]:
        total = comp.other + comp.nbytes("float", itemsize)
        return [Choice(comp.name, comp.ladder[0], total, None)] if total <= room else None
    for i, scheme in enumerate(comp.ladder):
        total = comp.total(scheme, itemsize)
        if total > room:
            continue
        if i == 0:
            return [Choice(comp.name, scheme, total, comp.error(scheme))]
        high = comp.ladder[i - 1]
        # a per-layer mix is written as GGUF layers (each keeps its type); other rungs go whole
        layers = _mix(comp, high, scheme, itemsize, room - total)[0] \
            if scheme.startswith("gguf:") else []
        if not layers:
            return [Choice(comp.name, scheme, total, comp.error(scheme))]
        rest = [n for n in comp.linear if n not in layers]
        return [Choice(comp.name, high, comp.nbytes(high, itemsize, layers),
                       comp.error(high, layers), layers, f"{len(layers)} most sensitive layers"),
                Choice(comp.name, scheme, comp.other + comp.nbytes(scheme, itemsize, rest),
                       comp.error(scheme, rest), [], f"the other {len(rest)} layers")]
    return None


def plan_pipeline(src, max_memory, *, dtype=torch.bfloat16, height: int = 512, width: int = 512,
                  max_sequence_length: int = 512, batch: int = 1, sensitivity: dict | None = None,
                  baseline: int | None = None) -> Plan:
    """The plan for pipeline folder ``src`` under ``max_memory`` for a run of ``batch`` images of
    height x width; raises ConfigError naming the smallest budget that would work when nothing
    fits. ``sensitivity``: {component: {layer: {scheme: error}}} (diffquant sensitivity's JSON);
    ``baseline``: the process's memory before loading (default: this process's now)."""
    budget = memory.parse_memory(max_memory)
    root = Path(src)
    index = json.loads((root / "model_index.json").read_text())
    itemsize = torch.empty((), dtype=dtype).element_size()
    base = memory.run_baseline(index) if baseline is None else baseline
    budget_in = budget
    budget = int(budget * (1 - MARGIN))
    comps = _components(root, index, dtype, sensitivity)
    vae = comps["vae"].total("float", itemsize) if "vae" in comps else 0
    run = dict(height=height, width=width, max_sequence_length=max_sequence_length, batch=batch)
    acts = _activations(root, comps, run, itemsize)
    choices, phases, shortfall = [], {}, []

    def fit(names: list[str], phase: str, act: int):
        """Choices for the components of one phase: the fixed ones as they are, then each
        quantizable one the best that fits beside the others' smallest."""
        fixed = [n for n in names if len(comps[n].ladder) == 1]
        flex = [n for n in names if len(comps[n].ladder) > 1]
        held = vae + act + sum(comps[n].total("float", itemsize) for n in fixed)
        smallest = {n: comps[n].total(comps[n].ladder[-1], itemsize) for n in flex}
        if base + held + sum(smallest.values()) > budget:
            shortfall.append(base + held + sum(smallest.values()))
            return
        picked = [Choice(n, comps[n].ladder[0], comps[n].total("float", itemsize), None)
                  for n in fixed]
        for i, n in enumerate(flex):
            room = budget - base - held - sum(c.nbytes for c in picked if c.component in flex) \
                - sum(smallest[m] for m in flex[i + 1:])
            picked += _choose(comps[n], room, itemsize)
        choices.extend(picked)
        phases[phase] = held + sum(c.nbytes for c in picked if c.component in flex)

    encoders = [n for n in comps if n.startswith("text_encoder")]
    fit(encoders, "encode", acts["encode"])
    denoisers = [n for n in comps if n.startswith(("transformer", "unet"))]
    largest = max((comps[n].largest for n in denoisers), default=0)
    # planned with the quantized layers' decode buffer; a denoiser left all float has none
    fit(denoisers, "denoise", max(acts["denoise_quantized"], largest))
    if "denoise" in phases and all(c.scheme in ("float", "as saved") for c in choices
                                   if c.component in denoisers):
        phases["denoise"] += max(acts["denoise"], largest) \
            - max(acts["denoise_quantized"], largest)
    tile, decode = _decode_fit(root, run, itemsize, budget - base - vae)
    phases["decode"] = vae + decode
    if "vae" in comps:
        choices.append(Choice("vae", "float", vae, None))
    if shortfall or base + phases["decode"] > budget:
        _refuse(src, budget_in, max(shortfall + [base + phases["decode"]]), base, vae, run)
    return Plan(budget_in, base, str(dtype).split(".")[-1], choices, phases, tile, run)


def _components(root: Path, index: dict, dtype, sensitivity) -> dict:
    """The planned components: those of model_index.json with a config and safetensors weights."""
    return {n: _component(root, n, e, dtype, sensitivity) for n, e in index.items()
            if not n.startswith("_") and isinstance(e, list) and e[0] is not None
            and (root / n / "config.json").is_file() and list((root / n).glob("*.safetensors"))}


def _refuse(src, budget_in: int, need: int, base: int, vae: int, run: dict):
    """No plan fits: say what a phase still needs and the smallest budget that would work."""
    raise ConfigError(
        f"max_memory={gb(budget_in)}: no plan fits {src}: with every component at its smallest "
        f"scheme a phase still needs {gb(need)} (this process {gb(base)}, the VAE {gb(vae)}, "
        f"activations for {run['batch']} x {run['height']}x{run['width']}); the smallest budget "
        f"that would work is {gb(math.ceil(need / (1 - MARGIN) / 1e7) * 1e7)}")


def _activations(root: Path, comps: dict, run: dict, itemsize: int) -> dict:
    encode = sum(memory.encode_activations(root / n, run["max_sequence_length"] if n.endswith("_2")
                                           else 77, run["batch"], itemsize)
                 for n in comps if n.startswith("text_encoder"))
    denoise = {True: 0, None: 0}
    if "transformer" in comps:
        tokens = (run["height"] // 16) * (run["width"] // 16)  # VAE x8, then 2x2 patches
        denoise = {q: memory.denoise_activations(root / "transformer", tokens,
                                                 run["max_sequence_length"], run["batch"],
                                                 itemsize, q) for q in denoise}
    return {"encode": encode + memory.RUN_OVERHEAD, "denoise": denoise[None] + memory.RUN_OVERHEAD,
            "denoise_quantized": denoise[True] + memory.RUN_OVERHEAD}


def _decode_fit(root: Path, run: dict, itemsize: int, room: int) -> tuple[int | None, int]:
    """(tile or None for whole, activations) of the VAE decode within ``room`` bytes, as the
    residency chooses it at run time."""
    from .residency import TILES

    args = (root / "vae", run["height"], run["width"], run["batch"], itemsize)
    room -= memory.RUN_OVERHEAD
    whole = memory.decode_activations(*args) + memory.RUN_OVERHEAD
    if whole <= room:
        return None, whole
    for tile in TILES:
        act = memory.decode_activations(*args, tile)
        if act <= room or tile == TILES[-1]:
            return tile, act + memory.RUN_OVERHEAD

