"""The file formats Flux LoRAs are shared in, each converted to one internal form.

The internal form is ``{"<component>.<module>": LoraWeight}``: the low-rank factors of one
``nn.Linear`` (or quantized linear) of a pipeline component, with diffusers' module names
(``transformer.transformer_blocks.0.attn.to_q``, ``text_encoder.text_model.encoder.layers.0.
self_attn.q_proj``). A layer's update is ``scale * up @ down`` with ``scale = alpha / rank``.

Formats, recognised by their keys as diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` does:

- diffusers / PEFT (ai-toolkit, diffusers' trainers): ``transformer.<module>.lora_A.weight``,
  ``.lora_B.weight``, optional ``.alpha`` or safetensors metadata ``lora_adapter_metadata``;
- kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up``
  / ``.alpha`` (and ComfyUI's ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``),
  ``lora_te1_...`` for CLIP; alpha is folded into the factors exactly as diffusers' converter
  folds it, so both give the same tensors;
- XLabs: ``double_blocks.0.processor.qkv_lora1.down.weight`` ...;
- BFL's original names with PEFT factors: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``.

Fused projections (``qkv``, single blocks' ``linear1`` = q, k, v, MLP input) split by the model's
own widths (``widths``), or, without a model, by Flux's layout (q = k = v, MLP = 4x).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..single_file import _FLUX_RENAMES, _FLUX_SPLITS  # BFL -> diffusers names, one table

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder")
IGNORED_COMPONENTS = ("text_encoder_2",)  # T5 LoRAs: diffusers does not load them either
_BFL_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.", "time_in.",
              "vector_in.", "guidance_in.")


@dataclass
class LoraWeight:
    """One layer's adapter: ``down`` (A) [rank, in], ``up`` (B) [out, rank], ``alpha`` (None:
    scale 1), and ``source``, the file's key it came from (for messages)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    source: str = ""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


# -- detection and the diffusers form ----------------------------------------------------------
def convert(state_dict: dict, where: str, metadata: dict | None = None,
            widths=None) -> tuple[dict[str, LoraWeight], list[str]]:
    """(internal form, ignored keys) of a LoRA ``state_dict`` read from ``where``.

    ``widths(module)`` gives a transformer layer's output width (the model's own sizes, to split
    fused projections); None uses Flux's layout. Keys no format knows are an error naming them.

    Example:
        >>> sd = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.ones(2, 4),
        ...       "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.ones(24, 2)}
        >>> list(convert(sd, "x.safetensors")[0])
        ['transformer.transformer_blocks.0.norm1.linear']
    """
    sd = dict(state_dict)
    ignored = [k for k in sd if "dora_scale" in k]  # DoRA: dropped as diffusers drops it
    for k in ignored:
        del sd[k]
    if any(k.endswith(".lora_down.weight") for k in sd):
        if any(k.startswith("transformer.") for k in sd):  # PEFT names with kohya's leaves
            sd = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
                  for k, v in sd.items()}
            return _from_diffusers(sd, where, metadata), ignored
        from .kohya import from_kohya  # it builds on the helpers here

        out, more = from_kohya(sd, where, widths)
        return out, ignored + more
    if any(".processor." in k for k in sd):
        return _from_xlabs(sd, where), ignored
    if any(_strip_bfl(k).startswith(_BFL_ROOTS) for k in sd):
        return _from_bfl_peft(sd, where, widths), ignored
    out = _from_diffusers(sd, where, metadata)
    return out, ignored


def to_diffusers(weights: dict[str, LoraWeight]) -> tuple[dict, dict]:
    """(state dict ``<name>.lora_A.weight`` / ``.lora_B.weight``, network alphas
    ``<name>.alpha`` for adapters that have one): diffusers' ``lora_state_dict`` form."""
    sd, alphas = {}, {}
    for name, w in weights.items():
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = w.down, w.up
        if w.alpha is not None:
            alphas[f"{name}.alpha"] = w.alpha
    return sd, alphas


def bad_key(where, key, why) -> CheckpointError:
    return CheckpointError(f"{where}: LoRA key {key!r}: {why}")


# -- diffusers / PEFT ---------------------------------------------------------------------------
def _from_diffusers(sd: dict, where: str, metadata: dict | None) -> dict[str, LoraWeight]:
    out, alphas = {}, {}
    for key in sd:
        if key.endswith(".alpha"):
            alphas[_with_component(key[:-len(".alpha")])] = read_alpha(sd[key], where, key)
            continue
        stem, _, leaf = key.rpartition(".lora_A.")
        if not stem:
            stem, _, leaf = key.rpartition(".lora_B.")
        if not stem or leaf != "weight":
            raise bad_key(where, key, "not a LoRA factor (expected <module>.lora_A.weight, "
                       "<module>.lora_B.weight or <module>.alpha; DoRA, LoRA biases and "
                       "norm weights are not supported)")
        name = _with_component(stem)
        if name not in out:
            down, up = sd.get(f"{stem}.lora_A.weight"), sd.get(f"{stem}.lora_B.weight")
            if down is None or up is None:
                raise bad_key(where, key, f"its pair {'lora_B' if up is None else 'lora_A'} is missing")
            out[name] = LoraWeight(down, up, None, key)
    configs = _metadata_configs(metadata, where)
    for name, w in out.items():
        w.alpha = alphas.get(name, _metadata_alpha(configs, name))
    unknown = set(alphas) - set(out)
    if unknown:
        raise bad_key(where, sorted(unknown)[0] + ".alpha", "an alpha without its lora_A/lora_B")
    return out


def _with_component(stem: str) -> str:
    """Keys without a component prefix are the transformer's (diffusers' converters write the
    kohya final layer and embedders so)."""
    head = stem.split(".", 1)[0]
    return stem if head in COMPONENTS + IGNORED_COMPONENTS else f"transformer.{stem}"


def read_alpha(value, where, key) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise bad_key(where, key, f"alpha should be one number, got {value.dtype} "
                          f"{list(value.shape)}")
        return value.item()
    return float(value)


def _metadata_configs(metadata: dict | None, where: str) -> dict:
    """diffusers' ``lora_adapter_metadata``: ``{"transformer": {"lora_alpha": ..}, ...}``."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: metadata 'lora_adapter_metadata' is not JSON ({err})") from None
    configs: dict = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        configs.setdefault(comp, {})[field] = value
    return configs


def _metadata_alpha(configs: dict, name: str) -> float | None:
    comp, _, module = name.partition(".")
    cfg = configs.get(comp)
    if not cfg or cfg.get("lora_alpha") is None:
        return None
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        bare = pattern.lstrip("^")
        if module == bare or module.endswith("." + bare) or re.fullmatch(bare, module):
            return float(alpha)
    return float(cfg["lora_alpha"])


# -- BFL names: the module tables of single_file.py ---------------------------------------------
def _strip_bfl(key: str) -> str:
    for prefix in _BFL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def bfl_targets(stem: str) -> tuple[list[str], bool] | None:
    """(diffusers module names, swap halves) of a BFL module name; several for fused ones."""
    if stem == "final_layer.adaLN_modulation.1":
        return ["norm_out.linear"], True  # BFL's (shift, scale) is diffusers' (scale, shift)
    for pattern, targets in _FLUX_SPLITS:
        if pattern.match(stem):
            return [pattern.sub(t, stem) for t in targets], False
    for pattern, target in _FLUX_RENAMES:
        if pattern.match(stem):
            return [pattern.sub(target, stem)], False
    return None


def split_sizes(targets: list[str], rows: int, widths) -> list[int]:
    """Row counts of a fused projection's parts: q = k = v (and the MLP of ``linear1``)."""
    if widths is not None:
        sizes = [widths(t) for t in targets]
        if all(s is not None for s in sizes) and sum(sizes) == rows:
            return sizes
    if len(targets) == 3 and rows % 3 == 0:
        return [rows // 3] * 3
    if len(targets) == 4 and rows % 7 == 0:  # Flux's single block: 3 x inner + 4 x inner
        return [rows // 7] * 3 + [4 * rows // 7]
    return []


def _from_bfl_peft(sd: dict, where: str, widths) -> dict[str, LoraWeight]:
    """BFL names with PEFT factors (``double_blocks.0.img_attn.qkv.lora_A.weight``): fused
    projections share ``lora_A`` and split ``lora_B`` by rows, as diffusers' BFL converter."""
    plain = {}
    for key, value in sd.items():
        stem = _strip_bfl(key)
        if not stem.startswith(_BFL_ROOTS):
            raise bad_key(where, key, "mixes BFL (double_blocks.N...) and other key names")
        plain[stem] = (key, value)
    renamed, out = {}, {}
    for stem, (key, value) in plain.items():
        module, _, leaf = stem.rpartition(".lora_")
        if not module or leaf not in ("A.weight", "B.weight"):
            if stem.endswith(".alpha"):
                continue
            raise bad_key(where, key, "not a LoRA factor (expected .lora_A.weight, .lora_B.weight or "
                       ".alpha; Flux Control LoRAs' norms and biases are not supported)")
        renamed.setdefault(module, {})[leaf[0]] = (key, value)
    for module, parts in renamed.items():
        if set(parts) != {"A", "B"}:
            raise bad_key(where, next(iter(parts.values()))[0], "its lora_A/lora_B pair is incomplete")
        (key, down), (_, up) = parts["A"], parts["B"]
        alpha_key = next((k for s, (k, _) in plain.items() if s == f"{module}.alpha"), None)
        alpha = read_alpha(sd[alpha_key], where, alpha_key) if alpha_key else None
        out.update(_split_fused(module, down, up, alpha, key, where, widths))
    return out


def _split_fused(module, down, up, alpha, key, where, widths) -> dict[str, LoraWeight]:
    found = bfl_targets(module)
    if found is None:
        raise bad_key(where, key, f"{module!r} is no Flux layer")
    targets, swap = found
    names = [f"transformer.{t}" for t in targets]
    if swap:
        up = torch.cat(up.chunk(2, dim=0)[::-1])
    if len(targets) == 1:
        return {names[0]: LoraWeight(down, up, alpha, key)}
    sizes = split_sizes(targets, up.shape[0], widths)
    if not sizes:
        raise bad_key(where, key, f"lora_B has {up.shape[0]} rows, which do not split into "
                   f"{', '.join(targets)} of this model")
    return {n: LoraWeight(down, part, alpha, key) for n, part in zip(names, up.split(sizes))}


# -- XLabs --------------------------------------------------------------------------------------
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\."
                    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight$")
_XLABS_TARGETS = {
    ("double", "qkv_lora1"): ["attn.to_q", "attn.to_k", "attn.to_v"],
    ("double", "qkv_lora2"): ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ("double", "proj_lora1"): ["attn.to_out.0"], ("double", "proj_lora2"): ["attn.to_add_out"],
    ("single", "qkv_lora"): ["attn.to_q", "attn.to_k", "attn.to_v"], ("single", "proj_lora"): ["proj_out"],
}


def _from_xlabs(sd: dict, where: str) -> dict[str, LoraWeight]:
    """XLabs' processor LoRAs (no alpha); q, k, v share ``down`` and split ``up`` in thirds."""
    out = {}
    for key in sd:
        m = _XLABS.match(key)
        if m is None:
            raise bad_key(where, key, "not an XLabs LoRA key (double_blocks.N.processor."
                       "qkv_lora1.down.weight ...)")
        if m[4] == "up":
            continue
        up_key = key[:-len("down.weight")] + "up.weight"
        if up_key not in sd:
            raise bad_key(where, key, f"its pair {up_key!r} is missing")
        block = "transformer_blocks" if m[1] == "double" else "single_transformer_blocks"
        targets = [f"transformer.{block}.{m[2]}.{t}" for t in _XLABS_TARGETS[m[1], m[3]]]
        down, up = sd[key], sd[up_key]
        parts = up.split(up.shape[0] // len(targets)) if len(targets) > 1 else [up]
        out.update({t: LoraWeight(down, p, None, key) for t, p in zip(targets, parts)})
    return out

