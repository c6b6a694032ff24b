"""kohya sd-scripts' Flux LoRAs (and ComfyUI's, under BFL names) -> the internal form.

``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``:
the module name is BFL's with dots written as underscores. kohya scales a layer's update by
``alpha / rank``; as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` does, that scale is
folded into the factors (split between down and up so neither under- nor overflows), with the
same arithmetic, so the tensors equal diffusers'. A fused projection's ``lora_down`` is shared
by its parts and ``lora_up`` split by rows, unless ``lora_up`` is block-diagonal (each part
trained its own rows of the rank), when both are cut, as diffusers cuts them.

Differences from diffusers 0.42, on purpose: ``linear1`` splits by the model's own widths (not
Flux.1's 3072 written in), the final layer's alpha is applied (diffusers' converter leaves it
out), and keys that match no Flux layer are an error (diffusers warns and drops them).
"""

from __future__ import annotations

import re

import torch

from .formats import LoraWeight, bad_key, bfl_targets, read_alpha, split_sizes

# what diffusers drops from kohya/ComfyUI files (not LoRA factors of a layer it loads)
_DROPPED = ("position_embedding", "text_encoders.t5xxl.transformer.", "text_projection")
_TOP = {"img_in": "img_in", "txt_in": "txt_in", "final_layer_linear": "final_layer.linear",
        "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
_EMBEDDER = re.compile(r"^(time_in|vector_in|guidance_in)_(in_layer|out_layer)$")
_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_STREAM = re.compile(r"^(img|txt)_(attn|mlp|mod)_(.+)$")
_TEXT = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(.+)$")


def from_kohya(sd: dict, where: str, widths) -> tuple[dict[str, LoraWeight], list[str]]:
    """(internal form, keys ignored) of a kohya / ComfyUI state dict."""
    sd = {k.replace("diffusion_model.", "lora_unet_")
          .replace("text_encoders.clip_l.transformer.", "lora_te_"): (k, v) for k, v in sd.items()}
    ignored = [orig for k, (orig, _) in sd.items() if _dropped(k)]
    modules: dict[str, dict] = {}
    for key, (orig, value) in sd.items():
        if _dropped(key):
            continue
        for leaf in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(leaf):
                name = key[:-len(leaf)].replace(".", "_")  # ComfyUI's dots, kohya's underscores
                modules.setdefault(name, {})[leaf] = (orig, value)
                break
        else:
            raise bad_key(where, orig, "not a kohya LoRA factor (.lora_down.weight, "
                          ".lora_up.weight or .alpha)")
    out = {}
    for name, parts in modules.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise bad_key(where, next(iter(parts.values()))[0],
                          "its lora_down/lora_up pair is incomplete")
        if name.startswith("lora_te2_"):  # T5: diffusers does not load it either
            ignored += [orig for orig, _ in parts.values()]
        elif name.startswith(("lora_te_", "lora_te1_")):
            out.update(_text_encoder(name, parts, where))
        elif name.startswith("lora_unet_"):
            out.update(_transformer(name[len("lora_unet_"):], parts, where, widths))
        else:
            raise bad_key(where, parts[".lora_down.weight"][0], "neither lora_unet_ (the "
                          "transformer) nor lora_te_/lora_te1_ (CLIP)")
    return out, ignored


def _dropped(key: str) -> bool:
    return any(d in key for d in _DROPPED) or (".diff" in key and ".lora" not in key)


def _fold(down: torch.Tensor, up: torch.Tensor, scale):
    """diffusers' split of ``scale`` between the factors: down x s_d, up x s_u, s_d * s_u = scale,
    s_u halved while s_d doubles until s_d * 2 >= s_u."""
    scale_down, scale_up = scale, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return down * scale_down, up * scale_up


def _bfl_name(name: str) -> str | None:
    """kohya's ``double_blocks_0_img_attn_qkv`` -> BFL's ``double_blocks.0.img_attn.qkv``."""
    if name in _TOP:
        return _TOP[name]
    m = _EMBEDDER.match(name)
    if m:
        return f"{m[1]}.{m[2]}"
    m = _BLOCK.match(name)
    if m is None:
        return None
    rest = _STREAM.sub(r"\1_\2.\3", m[3]).replace("modulation_lin", "modulation.lin")
    return f"{m[1]}.{m[2]}.{rest}"


def _transformer(name: str, parts: dict, where: str, widths) -> dict[str, LoraWeight]:
    key, down = parts[".lora_down.weight"]
    up = parts[".lora_up.weight"][1]
    bfl = _bfl_name(name)
    found = bfl_targets(bfl) if bfl else None
    if found is None:
        raise bad_key(where, key, f"{name!r} is no Flux transformer layer")
    targets, swap = found
    names = [f"transformer.{t}" for t in targets]
    rank = down.shape[0]
    if len(targets) == 1:
        alpha = read_alpha(parts[".alpha"][1], where, parts[".alpha"][0]) if ".alpha" in parts \
            else float(rank)
        down, up = _fold(down, up, alpha / rank)
        if swap:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        return {names[0]: LoraWeight(down, up, None, key)}
    # fused: diffusers keeps alpha a tensor here (its dtype rounds the scale), so do we
    alpha = parts[".alpha"][1] if ".alpha" in parts else \
        torch.tensor(rank, dtype=down.dtype, device=down.device)
    down, up = _fold(down, up, alpha / rank)
    sizes = split_sizes(targets, up.shape[0], widths)
    if not sizes:
        raise bad_key(where, key, f"lora_up has {up.shape[0]} rows, which do not split into "
                      f"{', '.join(targets)} of this model")
    downs, ups = _split(down, up, sizes)
    return {n: LoraWeight(d, u, None, key) for n, d, u in zip(names, downs, ups)}


def _split(down: torch.Tensor, up: torch.Tensor, sizes: list[int]):
    """Each part's (down, up): the shared down and its rows of up, or, when up is block-diagonal
    over rank / parts, each part's own rank slice of both (diffusers' "sparse" case)."""
    n, rank = len(sizes), down.shape[0]
    if rank % n == 0:
        r = rank // n
        bounds = [sum(sizes[:j]) for j in range(n + 1)]
        sparse = all(torch.all(up[bounds[j]:bounds[j + 1], k * r:(k + 1) * r] == 0)
                     for j in range(n) for k in range(n) if j != k)
        if sparse:
            return (list(down.chunk(n, dim=0)),
                    [up[bounds[j]:bounds[j + 1], j * r:(j + 1) * r].contiguous() for j in range(n)])
    return [down] * n, list(up.split(sizes, dim=0))


def _text_encoder(name: str, parts: dict, where: str) -> dict[str, LoraWeight]:
    """``lora_te1_text_model_encoder_layers_0_self_attn_q_proj`` -> CLIP's module name."""
    key, down = parts[".lora_down.weight"]
    m = _TEXT.match(name.split("_", 2)[2])
    if m is None:
        raise bad_key(where, key, "not a CLIP encoder layer (lora_te1_text_model_encoder_layers_"
                      "N_self_attn_q_proj, ..._mlp_fc1)")
    up = parts[".lora_up.weight"][1]
    if ".alpha" in parts:
        alpha = read_alpha(parts[".alpha"][1], where, parts[".alpha"][0])
        down, up = _fold(down, up, alpha / down.shape[0])
    return {f"text_encoder.text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}":
            LoraWeight(down, up, None, key)}
