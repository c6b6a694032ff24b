"""Export a model as one ``.gguf`` file that the GGUF ecosystem loads: ``export_gguf``.

Flux transformers are written in the community layout by default, as city96's and QuantStack's
FLUX.1 GGUF files are: the original Black Forest Labs key names with q, k and v fused
(``double_blocks.N.img_attn.qkv``; ``single_blocks.N.linear1`` = q, k, v and the MLP input),
which ComfyUI-GGUF, stable-diffusion.cpp, Forge and diffusers load; ComfyUI-GGUF cannot load
quantized diffusers-named files (it fuses q, k and v itself, and cannot fuse ggml blocks).
Fusing is a concatenation of rows, exact for ggml blocks (a block never crosses a row), so a
GGUF model's blocks are copied, never requantized. ``layout="diffusers"`` writes diffusers'
own names instead (the parts of a fused tensor still share its type).

The file carries the metadata community files carry (``general.architecture``,
``general.quantization_version`` = 2, which the GGUF specification requires when a tensor is
quantized, ``general.file_type``, ``general.alignment``), and the types come from a recipe
(``gguf_recipes``): 1-D and small tensors F32, embedders and the final layer in BF16, the rest
in the recipe's type, with per-layer ``overrides`` by glob.

Example:
    >>> from diffquant import FluxTransformer2DModel, default_pipeline_path
    >>> from diffquant.gguf_export import export_gguf
    >>> m = FluxTransformer2DModel.from_pretrained(default_pipeline_path(), subfolder="transformer")
    >>> path = export_gguf(m, "/tmp/flux-Q8_0.gguf", "Q8_0")                    # doctest: +SKIP
    >>> export_gguf(m, "/tmp/flux-Q4_K_M.gguf", recipe="Q4_K_M",               # doctest: +SKIP
    ...             overrides={"single_blocks.*.linear2.weight": "Q6_K"})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import ConfigError, QuantizationError
from .gguf_file import write_gguf
from .gguf_recipes import plan_types, resolve_recipe
from .ops.cpu.quantize import gguf_quantize  # formats.gguf.quantize's bytes, in C where it can
from .ops.formats.gguf import FLOAT_TYPES, GGMLType, dequantize
from .single_file import _FLUX_RENAMES, _FLUX_SPLITS

GGUF_QUANT_VERSION = 2  # gguf.GGML_QUANT_VERSION: the block layouts of ggml's current types
LAYOUTS = ("community", "diffusers")


# -- diffusers Flux names -> the original (BFL) names, inverted from single_file's tables --------
def _invert(pattern: re.Pattern, target: str) -> tuple[re.Pattern, str]:
    """(BFL stem regex, diffusers replacement) -> (diffusers stem regex, BFL replacement)."""
    diffusers = re.compile("^" + re.escape(target).replace(re.escape("\\1"), r"(\d+)") + "$")
    bfl = pattern.pattern[1:-1].replace(r"(\d+)", "\\1").replace("\\.", ".")
    return diffusers, bfl


_TO_BFL = [(*_invert(p, t), 0, 1) for p, t in _FLUX_RENAMES]
_TO_BFL += [(*_invert(p, t), j, len(targets)) for p, targets in _FLUX_SPLITS
            for j, t in enumerate(targets)]


class Part(NamedTuple):
    name: str          # the BFL key this diffusers key goes into
    index: int         # its rows' position in the fused tensor
    count: int         # how many parts the fused tensor has
    swap: bool = False  # final modulation: (shift, scale) in BFL, (scale, shift) in diffusers


def bfl_part(key: str) -> Part:
    """Where diffusers Flux key ``key`` goes in the original layout (unknown keys keep their name)."""
    stem, _, leaf = key.rpartition(".")
    if stem == "norm_out.linear":
        return Part(f"final_layer.adaLN_modulation.1.{leaf}", 0, 1, True)
    for regex, bfl, index, count in _TO_BFL:
        if regex.match(stem):
            new = regex.sub(bfl, stem)
            leaf = "scale" if new.endswith("_norm") and leaf == "weight" else leaf
            return Part(f"{new}.{leaf}", index, count)
    return Part(key, 0, 1)


def is_flux(keys) -> bool:
    keys = set(keys)
    return "x_embedder.weight" in keys and "context_embedder.weight" in keys and \
        any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys)


# -- the model's tensors: ggml blocks to copy, or floats to quantize ----------------------------
class Source(NamedTuple):
    value: torch.Tensor           # uint8 blocks (qtype set) or floats (qtype None)
    qtype: GGMLType | None = None


def model_sources(model: nn.Module) -> dict[str, Source]:
    """Every state-dict tensor of ``model``: a GGUF layer's quantized blocks as they are (its
    float-typed ones as floats), everything else as floats; ``weight_qtype`` entries dropped."""
    from .quantizers.gguf import GGUFEmbedding, GGUFLinear

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method) != "gguf":
        raise QuantizationError(f"export_gguf: this model is quantized with "
                                f"{quantizer.quantization_config.quant_method}; dequantize() it first")
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    sources = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "weight_qtype":
            continue
        if layer is not None and leaf == "weight":
            if layer.qtype in FLOAT_TYPES:
                value = dequantize(value, layer.qtype, FLOAT_TYPES[layer.qtype])
            else:
                sources[key] = Source(value, layer.qtype)
                continue
        sources[key] = Source(value.detach())
    # module order, weight before bias: a GGUF layer lists its bias first, nn.Linear its weight
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}

    def rank(key):
        owner, _, leaf = key.rpartition(".")
        return order.get(owner, len(order)), leaf != "weight", leaf
    return {k: sources[k] for k in sorted(sources, key=rank)}


def _fused(parts: list[Source], swap: bool, name: str) -> Source:
    kinds = {p.qtype for p in parts}
    if len(kinds) > 1:
        raise QuantizationError(f"export_gguf: the parts of {name!r} hold different types "
                                f"({sorted(k.name if k else 'float' for k in kinds)}); the community "
                                "layout fuses them into one tensor of one type: export with "
                                "layout='diffusers'")
    value = torch.cat([p.value for p in parts], dim=0) if len(parts) > 1 else parts[0].value
    if swap:  # rows [a; b] -> [b; a]
        value = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
    return Source(value, parts[0].qtype)


def community_sources(sources: dict[str, Source]) -> tuple[dict[str, Source], dict[str, tuple]]:
    """Diffusers-named Flux tensors -> (BFL-named fused tensors, BFL name -> diffusers names)."""
    groups: dict[str, list] = {}
    swaps = {}
    for key in sources:
        part = bfl_part(key)
        slots = groups.setdefault(part.name, [None] * part.count)
        if len(slots) != part.count or slots[part.index] is not None:
            raise ConfigError(f"export_gguf: diffusers keys {slots[part.index]!r} and {key!r} both "
                              f"map to {part.name!r}; this is not a Flux transformer's state dict")
        slots[part.index] = key
        swaps[part.name] = part.swap
    fused, aliases = {}, {}
    for name, keys in groups.items():
        if None in keys:
            raise ConfigError(f"export_gguf: {name!r} fuses {len(keys)} tensors but the model has "
                              f"only {[k for k in keys if k]}; export with layout='diffusers'")
        fused[name] = _fused([sources[k] for k in keys], swaps[name], name)
        aliases[name] = tuple(keys)
    return fused, aliases


def _shape(source: Source) -> tuple:
    if source.qtype is None:
        return tuple(source.value.shape)
    from .ops.formats.gguf import logical_shape

    return logical_shape(tuple(source.value.shape), source.qtype)


def _encode(source: Source, qtype: GGMLType) -> tuple[torch.Tensor, GGMLType]:
    if source.qtype is not None:  # ggml blocks: copied as they are
        return source.value, source.qtype
    value = source.value.float() if qtype not in FLOAT_TYPES else source.value
    return gguf_quantize(value, qtype), qtype


def _split_rows(blocks: torch.Tensor, keys: tuple, sources: dict, swap: bool) -> dict:
    """A fused tensor's encoded rows back to its diffusers parts (the inverse of ``_fused``)."""
    if swap:
        blocks = torch.cat(blocks.chunk(2, dim=0)[::-1], dim=0)
    sizes = [_shape(sources[k])[0] for k in keys]
    per_row = blocks.shape[0] // sum(sizes)  # 1-D tensors are bytes: 4 (F32) per value
    return dict(zip(keys, blocks.split([n * per_row for n in sizes], dim=0)))


def export_gguf(model: nn.Module, path, qtype=None, *, recipe: str | None = None,
                overrides=None, layout: str | None = None, float_type="BF16",
                arch: str = "flux", progress: bool = False) -> Path:
    """Write ``model`` as one ``.gguf`` file; returns its path.

    Args:
        qtype: a tensor type for every quantizable weight ("Q8_0", "Q4_K", "BF16", ...), or
        recipe: a named mixture ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S"); Q8_0 if neither.
        overrides: {glob: type} per layer, matched against the file's names and (Flux) the
            diffusers names of their parts; applied last.
        layout: "community" (Flux default: original names, fused qkv) or "diffusers".
        float_type: the type of the layers kept unquantized (embedders, final layer).
        progress: tqdm bars while quantizing and writing.

    A GGUF model's quantized layers keep their blocks; the recipe types its float tensors.

    Example:
        >>> export_gguf(model, "flux-Q4_K_M.gguf", recipe="Q4_K_M")               # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    chosen = resolve_recipe(qtype, recipe)
    sources = model_sources(model)
    flux = is_flux(sources)
    layout = layout or ("community" if flux else "diffusers")
    if layout not in LAYOUTS:
        raise ConfigError(f"export_gguf: layout={layout!r}; expected one of {list(LAYOUTS)}")
    if layout == "community" and not flux:
        raise ConfigError(f"export_gguf: the community layout is defined for Flux transformers; "
                          f"{type(model).__name__} is written with layout='diffusers'")
    if flux:
        planned, aliases = community_sources(sources)
    else:
        planned, aliases = sources, {k: () for k in sources}
    entries = [(name, aliases[name], _shape(s)) for name, s in planned.items()]
    types = plan_types(entries, chosen, arch if flux else "", overrides, float_type)
    tensors = {}
    for name, source in tqdm(planned.items(), desc="quantizing", unit="tensor", disable=not progress):
        blocks, kind = _encode(source, types[name])
        if layout == "community" or not flux:
            tensors[name] = (blocks, kind)
            continue
        swap = bfl_part(aliases[name][0]).swap
        for key, rows in _split_rows(blocks, aliases[name], sources, swap).items():
            tensors[key] = (rows.contiguous(), kind)
    metadata = {"general.quantization_version": GGUF_QUANT_VERSION,
                "general.file_type": chosen.file_type}
    return write_gguf(path, tensors, arch=arch, metadata=metadata, progress=progress)


def _rows(raw: torch.Tensor, start: int | None, stop: int | None, n_rows: int,
          swap: bool) -> torch.Tensor:
    """Rows [start, stop) of a tensor's stored bytes (1-D tensors: bytes per value scaled)."""
    per_row = raw.shape[0] // n_rows
    if start is not None:
        raw = raw[start * per_row:stop * per_row]
    if swap:
        raw = torch.cat(raw.chunk(2, dim=0)[::-1], dim=0)
    return raw.contiguous()


def relayout_gguf(src, dst, layout: str = "community", progress: bool = False) -> Path:
    """Rewrite a Flux ``.gguf`` file with the other key layout; every tensor keeps its type and
    bytes (fusing and splitting move whole rows of ggml blocks).

    Example:
        >>> relayout_gguf("flux-diffusers-Q8_0.gguf", "flux-Q8_0.gguf", "community")  # doctest: +SKIP
    """
    from .gguf_file import GGUFFile
    from .single_file import PREFIXES, flux_bfl_plan, is_bfl_flux

    if layout not in LAYOUTS:
        raise ConfigError(f"relayout_gguf: layout={layout!r}; expected one of {list(LAYOUTS)}")
    with GGUFFile(src) as f:
        strip = {n: n[len(p):] for n in f.tensors for p in PREFIXES if n.startswith(p)}
        infos = {strip.get(n, n): info for n, info in f.tensors.items()}
        shapes = {n: info.shape for n, info in infos.items()}
        if not (is_bfl_flux(shapes) or is_flux(shapes)):
            raise ConfigError(f"{f.path}: not a Flux transformer file (neither original nor "
                              "diffusers key names); its layout cannot be changed")
        raw = {n: f.read(info.name) for n, info in infos.items()}
        file_type = f.metadata.get("general.file_type")
    tensors = {}
    if is_bfl_flux(shapes) and layout == "diffusers":
        for key, piece in flux_bfl_plan(shapes).items():
            n_rows = shapes[piece.source][0]
            tensors[key] = (_rows(raw[piece.source], piece.start, piece.stop, n_rows,
                                  piece.swap_halves), infos[piece.source].qtype)
    elif is_flux(shapes) and layout == "community":
        sources = {k: Source(raw[k], infos[k].qtype) for k in raw}
        fused, _ = community_sources(sources)
        tensors = {k: (v.value.contiguous(), v.qtype) for k, v in fused.items()}
    else:
        tensors = {k: (raw[k], infos[k].qtype) for k in raw}
    metadata = {"general.quantization_version": GGUF_QUANT_VERSION}
    if isinstance(file_type, int):
        metadata["general.file_type"] = file_type
    return write_gguf(dst, tensors, arch="flux", metadata=metadata, progress=progress)


__all__ = ["LAYOUTS", "bfl_part", "community_sources", "export_gguf", "is_flux", "model_sources",
           "relayout_gguf"]
