"""Synthetic captioned shapes for the shipped default pipeline, and tokenizers for its vocabulary.

Scenes are one or two flat shapes on a flat background, drawn with 2x supersampling so edges are
anti-aliased. Captions come from a tiny grammar:

    "a red circle"                                  (grey background)
    "a green triangle on a yellow background"
    "a red circle above a blue square"              (grey background)
    "a white square left of a purple circle on a black background"

Two-object scenes keep each object inside its half of the canvas (top/bottom or left/right), so
"above" / "left of" can be checked by looking at halves.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img, caption = sample_scene(rng, size=64)
    >>> img.shape, img.dtype, caption.split()[0] in ("a", "an")
    ((64, 64, 3), dtype('uint8'), True)
"""

from __future__ import annotations

import functools
import re

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 225, 30),
    "green": (30, 165, 60), "blue": (30, 70, 225), "purple": (140, 50, 185),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
GREY = (128, 128, 128)          # background when the caption names none; not a vocabulary colour
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
WORDS = sorted({"a", "an", "on", "background", "of", "above", "below", "left", "right",
                *COLOURS, *SHAPES})
MAX_TOKENS = 16                 # longest caption is 12 words + bos/eos


# -- drawing ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _grid(n: int):
    """Pixel-centre coordinates (y, x), each [n, n]; cached because every scene needs them."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    return y, x


def shape_mask(shape: str, cy: float, cx: float, r: float, n: int) -> np.ndarray:
    """Boolean [n, n] mask of a shape centred at (cy, cx) with half-size r, in pixel units."""
    y, x = _grid(n)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        s = r * 0.86                 # equal area to the circle looks balanced
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "triangle":          # upright, base at cy + 0.8r, apex at cy - 1.1r
        top, bottom = cy - 1.1 * r, cy + 0.8 * r
        half_w = (y - top) / (bottom - top) * 1.1 * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half_w)
    raise ValueError(f"shapes_data: unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects, background, size: int, ss: int = 2) -> np.ndarray:
    """objects: [(shape, colour_rgb, cy, cx, r)] in output pixels -> uint8 [size, size, 3]."""
    n = size * ss
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = background
    for shape, rgb, cy, cx, r in objects:
        canvas[shape_mask(shape, cy * ss, cx * ss, r * ss, n)] = rgb
    canvas = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))   # box-filter downsample
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# -- scenes -----------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick_colours(rng, k: int, exclude=()):
    names = [c for c in COLOURS if c not in exclude]
    return list(rng.choice(names, size=k, replace=False))


# Ranges in pixels of a 64-pixel canvas. "loose" (positions anywhere in an object's half) trains
# the VAE, which must reconstruct anything; "tight" (each object near its slot centre, +-4 px)
# trains the transformer: the caption then nearly fixes the layout, so the little training the
# CPU budget allows goes into binding colours and shapes to the right place, not into layout.
LAYOUTS = {
    "loose": dict(single_r=(10, 17), single_c=(26, 38), pair_r=(7, 11.5), along=(13, 19),
                  across=(18, 46)),
    "tight": dict(single_r=(12, 16), single_c=(28, 36), pair_r=(9, 11.5), along=(15, 18),
                  across=(28, 36)),
}


def sample_scene(rng: np.random.Generator, size: int = 64, layout: str = "loose"):
    """One random (image uint8 [size, size, 3], caption) pair."""
    u, lay = size / 64.0, LAYOUTS[layout]
    two = rng.random() < 0.65
    named_bg = rng.random() < (0.3 if two else 0.7)
    bg_name = _pick_colours(rng, 1)[0] if named_bg else None
    excl = (bg_name,) if bg_name else ()
    if not two:
        colour, shape = _pick_colours(rng, 1, excl)[0], rng.choice(SHAPES)
        r = rng.uniform(*lay["single_r"]) * u
        cy, cx = rng.uniform(*lay["single_c"], size=2) * u
        objects, caption = [(shape, COLOURS[colour], cy, cx, r)], f"{_a(colour)} {shape}"
    else:
        c1, c2 = _pick_colours(rng, 2, excl)
        s1, s2 = rng.choice(SHAPES, size=2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        r1, r2 = rng.uniform(*lay["pair_r"], size=2) * u
        # along the relation axis: first object's centre in its half, second in the other
        a1, a2 = rng.uniform(*lay["along"], size=2) * u
        a1, a2 = (a1, size - a2) if rel in ("above", "left of") else (size - a1, a2)
        b1, b2 = rng.uniform(*lay["across"], size=2) * u               # across the axis
        if rel in ("above", "below"):
            p1, p2 = (a1, b1), (a2, b2)
        else:
            p1, p2 = (b1, a1), (b2, a2)
        objects = [(s1, COLOURS[c1], *p1, r1), (s2, COLOURS[c2], *p2, r2)]
        caption = f"{_a(c1)} {s1} {rel} {_a(c2)} {s2}"
    if bg_name:
        caption += f" on {_a(bg_name)} background"
    background = COLOURS[bg_name] if bg_name else GREY
    return render(objects, background, size), caption


_CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_PAIR = re.compile(r"^(an? \w+ \w+) (above|below|left of|right of) (an? \w+ \w+)( on an? \w+ background)?$")


def converse(caption: str) -> str:
    """The same scene described from the other object: "a red circle above a blue square" ->
    "a blue square below a red circle". Captions of one object come back unchanged.

    Training on both makes the transformer read the relation word, not just the word order.
    """
    m = _PAIR.match(caption)
    if not m:
        return caption
    first, rel, second, bg = m.groups()
    return f"{second} {_CONVERSE[rel]} {first}{bg or ''}"


def sample_batch(rng: np.random.Generator, n: int, size: int = 64, layout: str = "loose"):
    """n scenes -> (float tensor-ready array [n, 3, size, size] in [-1, 1], captions)."""
    imgs, caps = zip(*(sample_scene(rng, size, layout) for _ in range(n)))
    x = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return x, list(caps)


# -- tokenizers -------------------------------------------------------------------------------
def _bpe_vocab_and_merges(words):
    """CLIP-style BPE (end-of-word suffix "</w>") in which every vocabulary word is one token.

    Hand-written merges conflict ("r i" from "right" pre-empts "t r" inside "triangle"), so the
    merges are learned by tokenizers' own BPE trainer on the word list, which merges until each
    word is whole; single characters stay in the vocabulary so unknown words still tokenize.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=4096, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"))
    tok.train_from_iterator([" ".join(words)], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    # The trainer numbers the single-character word ends ("a</w>", "d</w>", ...) in hash order,
    # which changes from run to run; sort them so the ids (and a trained embedding) stay valid.
    ends = sorted(t for t in vocab if len(t) == 5 and t.endswith("</w>"))
    for tok_, id_ in zip(ends, sorted(vocab[t] for t in ends)):
        vocab[tok_] = id_
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab["<|startoftext|>"] = len(vocab)   # specials last, as in OpenAI's CLIP vocabulary
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_tokenizers():
    """(CLIPTokenizer, T5TokenizerFast) for WORDS; each vocabulary word is a single token."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab, merges = _bpe_vocab_and_merges(WORDS)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(ch, -8.0) for ch in sorted({ch for w in WORDS for ch in w})]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)
    for tok, name in ((clip, "CLIP"), (t5, "T5")):
        for w in WORDS:
            n = len(tok(w, add_special_tokens=False).input_ids)
            if n != 1:
                raise RuntimeError(f"shapes_data: {name} tokenizer splits {w!r} into {n} tokens")
    return clip, t5
