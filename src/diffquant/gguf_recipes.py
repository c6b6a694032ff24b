"""GGUF recipes: the type of every tensor of an exported file, as the community chooses them.

A recipe is named as llama.cpp names its file types: a tensor type (``Q8_0``, ``Q4_K``: every
quantizable weight in it) or a K-quant mixture (``Q4_K_M``, ``Q4_K_S``, ``Q5_K_M``, ``Q5_K_S``:
chosen layers one or two steps higher). Around it, the rules community files follow:

- 1-D tensors (biases, norm scales) and tensors of at most 1024 values stay F32
  (city96's ``tools/convert.py``: QUANTIZATION_THRESHOLD);
- a family's sensitive layers stay in the float type (``float_type``, BF16 by default, as in
  city96's Flux files): Flux's embedders and final layer (``img_in``, ``txt_in``, ``time_in``,
  ``vector_in``, ``guidance_in``, ``final_layer``; city96's ``tools/lcpp.patch``), T5's
  relative attention bias (llama.cpp never quantizes ``attn_rel_b``);
- a weight whose rows are not a multiple of the type's block size falls back to the float
  type (the patch's fallback);
- the mixtures' upgrades: for image models the patch's ``img_tensor_get_type`` (Flux's fused
  ``attn.qkv``: Q5_K in Q4_K_M, Q6_K in Q5_K_M); for T5, llama.cpp's ``llama_tensor_get_type``
  (``attn_v`` and ``ffn_down`` Q6_K on the ``use_more_bits`` layers of Q4_K_M / Q5_K_M, Q5_K on
  the first layers of Q4_K_S; ``token_embd``, which doubles as the output there, Q6_K).

The rules match a tensor's name in the file (Flux: its original BFL name, whatever the
layout written). ``overrides`` ({glob: type}) come last and win; a glob matches that name or
any of the tensor's ``aliases`` (the diffusers names of a fused tensor's parts), so ``*.to_v.weight`` and
``double_blocks.*.img_attn.qkv.weight`` both reach the fused qkv tensor.

Example:
    >>> from diffquant.gguf_recipes import plan_types, resolve_recipe
    >>> entries = [("img_in.weight", (), (3072, 64)),
    ...            ("double_blocks.0.img_attn.qkv.weight", (), (9216, 3072)),
    ...            ("double_blocks.0.img_attn.qkv.bias", (), (9216,))]
    >>> {k: t.name for k, t in plan_types(entries, resolve_recipe(recipe="Q4_K_M"), "flux").items()}
    {'img_in.weight': 'BF16', 'double_blocks.0.img_attn.qkv.weight': 'Q5_K', 'double_blocks.0.img_attn.qkv.bias': 'F32'}
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import QuantizationError
from .ops.formats.gguf import (BLOCK_LAYOUT, FLOAT_TYPES, QUANTIZABLE_TYPES, GGMLType, ggml_type,
                               quantizable_type)

T = GGMLType
SMALL_TENSOR = 1024  # city96's QUANTIZATION_THRESHOLD: at most this many values stay F32


@dataclass(frozen=True)
class Recipe:
    """A named choice of types: ``base`` for most weights, ``file_type`` for general.file_type."""

    name: str
    base: GGMLType
    file_type: int   # llama.cpp's LLAMA_FTYPE (gguf.LlamaFileType)
    mixture: bool = False


RECIPES: dict[str, Recipe] = {}


def _register(name: str, base: GGMLType, file_type: int, mixture: bool = False) -> None:
    if name in RECIPES:
        raise ValueError(f"GGUF recipe {name!r} registered twice")
    RECIPES[name] = Recipe(name, base, file_type, mixture)


for _name, _base, _ftype in [("F32", T.F32, 0), ("F16", T.F16, 1), ("BF16", T.BF16, 32),
                             ("Q8_0", T.Q8_0, 7), ("Q6_K", T.Q6_K, 18), ("Q5_1", T.Q5_1, 9),
                             ("Q5_0", T.Q5_0, 8), ("Q5_K", T.Q5_K, 16), ("Q4_1", T.Q4_1, 3),
                             ("Q4_0", T.Q4_0, 2), ("Q4_K", T.Q4_K, 14)]:
    _register(_name, _base, _ftype)
for _name, _base, _ftype in [("Q5_K_M", T.Q5_K, 17), ("Q5_K_S", T.Q5_K, 16),
                             ("Q4_K_M", T.Q4_K, 15), ("Q4_K_S", T.Q4_K, 14)]:
    _register(_name, _base, _ftype, mixture=True)


# -- the families' rules -----------------------------------------------------------------------
# Names of tensors kept in the float type: city96's lcpp.patch (Flux) and llama.cpp (T5).
KEEP_FLOAT = {
    "flux": ("txt_in.*", "img_in.*", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*"),
    "t5": ("*attn_rel_b.weight",),
}
# Upgrades: (globs, {recipe: (type, layers)}); layers: None (all), "more_bits" (llama.cpp's
# use_more_bits over the matching tensors in order), ("first", n), "first_eighth".
UPGRADES = {
    "flux": [  # img_tensor_get_type in city96's lcpp.patch
        (("*attn_v.weight", "*.to_v.weight", "*.v.weight"),
         {"Q4_K_M": (T.Q6_K, None), "Q5_K_M": (T.Q6_K, None), "Q4_K_S": (T.Q5_K, ("first", 4))}),
        (("*attn_qkv.weight", "*attn.qkv.weight", "*attention.qkv.weight"),
         {"Q4_K_M": (T.Q5_K, None), "Q5_K_M": (T.Q6_K, None)}),
        (("*ffn_down*", "*.ff.net.2.weight"),
         {"Q4_K_S": (T.Q5_K, None), "Q4_K_M": (T.Q6_K, None), "Q5_K_M": (T.Q6_K, None),
          "Q4_0": (T.Q4_1, None), "Q5_0": (T.Q5_1, None)}),
    ],
    "t5": [  # llama_tensor_get_type: token_embd is the output of an encoder-only model
        (("token_embd.weight",), {name: (T.Q6_K, None) for name in RECIPES
                                  if name not in ("Q8_0", "F32", "F16", "BF16")}),
        (("*attn_v.weight",),
         {"Q4_K_M": (T.Q6_K, "more_bits"), "Q5_K_M": (T.Q6_K, "more_bits"),
          "Q4_K_S": (T.Q5_K, ("first", 4))}),
        (("*ffn_down*",),
         {"Q4_K_M": (T.Q6_K, "more_bits"), "Q5_K_M": (T.Q6_K, "more_bits"),
          "Q4_K_S": (T.Q5_K, "first_eighth")}),
    ],
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _selected(layers, i: int, n: int) -> bool:
    if layers is None:
        return True
    if layers == "more_bits":
        return use_more_bits(i, n)
    if layers == "first_eighth":
        return i < n // 8
    return i < layers[1]  # ("first", n)


def resolve_recipe(qtype=None, recipe: str | None = None) -> Recipe:
    """The Recipe of a tensor type (``qtype``) or a recipe name; Q8_0 when neither is given.

    Example:
        >>> resolve_recipe("Q4_K").mixture, resolve_recipe(recipe="Q4_K_M").file_type
        (False, 15)
    """
    if qtype is not None and recipe is not None:
        raise QuantizationError(f"GGUF export: pass either a type ({qtype!r}) or a recipe "
                                f"({recipe!r}), not both; add per-layer overrides for the rest")
    name = recipe if recipe is not None else (qtype if qtype is not None else "Q8_0")
    key = name.name if isinstance(name, GGMLType) else str(name).upper()
    if key not in RECIPES:
        raise QuantizationError(f"GGUF export: unknown {'recipe' if recipe else 'type'} {name!r}; "
                                f"expected one of {sorted(RECIPES)}")
    return RECIPES[key]


def parse_overrides(items) -> dict[str, GGMLType]:
    """``["glob=TYPE", ...]`` or ``{glob: type}`` -> {glob: GGMLType}, checked."""
    pairs = items.items() if isinstance(items, dict) else [_split(s) for s in items or ()]
    out = {}
    for glob, qtype in pairs:
        kind = quantizable_type(qtype)
        if kind is None:
            raise QuantizationError(f"GGUF override {glob!r}: type {qtype!r}; expected one of "
                                    f"{[t.name for t in QUANTIZABLE_TYPES]}")
        out[str(glob)] = kind
    return out


def _split(text: str) -> tuple[str, str]:
    glob, sep, qtype = str(text).rpartition("=")
    if not sep or not glob:
        raise QuantizationError(f"GGUF override {text!r}: expected GLOB=TYPE, e.g. "
                                "'double_blocks.*.img_attn.qkv.weight=Q6_K'")
    return glob, qtype


def _matches(names, globs) -> bool:
    return any(fnmatchcase(n, g) for n in names for g in globs)


def fits(shape, qtype: GGMLType) -> bool:
    """Whether a tensor of ``shape`` can be stored as ``qtype`` (rows of whole blocks)."""
    return len(shape) >= 1 and shape[-1] % BLOCK_LAYOUT[qtype][0] == 0


def plan_types(entries, recipe: Recipe, family: str, overrides=None,
               float_type=T.BF16) -> dict[str, GGMLType]:
    """{name: GGMLType} for ``entries`` [(name, aliases, shape)] under ``recipe``.

    ``family`` picks the rules ("flux", "t5", or anything else: the generic rules only).
    """
    float_type = ggml_type(float_type)
    if float_type not in FLOAT_TYPES:
        raise QuantizationError(f"GGUF export: float_type={float_type.name}; expected F32, F16 or BF16")
    overrides = parse_overrides(overrides or {})
    keep = KEEP_FLOAT.get(family, ())
    upgrades = [(globs, rules[recipe.name]) for globs, rules in UPGRADES.get(family, [])
                if recipe.name in rules]
    counts = [sum(_matches((n,), g) for n, _, _ in entries) for g, _ in upgrades]
    seen = [0] * len(upgrades)
    plan = {}
    for name, aliases, shape in entries:
        names = (name, *aliases)
        numel = 1
        for d in shape:
            numel *= int(d)
        if len(shape) < 2 or numel <= SMALL_TENSOR:
            qtype = T.F32
        elif _matches((name,), keep) or recipe.base in FLOAT_TYPES:
            qtype = float_type if recipe.base not in FLOAT_TYPES else recipe.base
        else:
            qtype = recipe.base
            for j, (globs, (better, layers)) in enumerate(upgrades):
                if _matches((name,), globs):  # the file's own name, as llama.cpp matches
                    if _selected(layers, seen[j], counts[j]):
                        qtype = better
                    seen[j] += 1
                    break
            if not fits(shape, qtype):
                qtype = float_type
        for glob, kind in overrides.items():
            if _matches(names, (glob,)):
                qtype = kind
        if not fits(shape, qtype):
            raise QuantizationError(f"GGUF export: tensor {name!r} of shape {list(shape)} cannot be "
                                    f"{qtype.name}: its rows are not a multiple of "
                                    f"{BLOCK_LAYOUT[qtype][0]}; override it with a float type or "
                                    "a type of smaller blocks")
        plan[name] = qtype
    unused = [g for g in overrides if not any(_matches((n, *a), (g,)) for n, a, _ in entries)]
    if unused:
        example = f", e.g. {entries[0][0]!r}" if entries else ""
        raise QuantizationError(f"GGUF override {unused[0]!r} matches no tensor; globs match the "
                                f"file's names and the diffusers names of their parts{example}")
    return plan


__all__ = ["RECIPES", "Recipe", "fits", "parse_overrides", "plan_types", "resolve_recipe",
           "use_more_bits"]
