"""The shipped default pipeline draws what its prompt says, loads offline, and matches diffusers.

Images are classified pixel by pixel to the nearest colour of the training palette; a prompt
passes when the named colour dominates the named region (e.g. "above" -> top half) among the
pixels that are not background.
"""

import numpy as np
import pytest
import torch

from diffquant import FluxPipeline, default_pipeline_path

PALETTE = {  # the colours scripts/shapes_data.py draws with
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 225, 30),
    "green": (30, 165, 60), "blue": (30, 70, 225), "purple": (140, 50, 185),
    "white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128),
}
NAMES = list(PALETTE)
CALL = dict(height=64, width=64, max_sequence_length=16, output_type="np")

# (prompt, background, {region: colour that must dominate its non-background pixels}, seed).
# Pairs that differ only in the relation share a seed: an earlier model drew "above" and
# "below" (and "left of" / "right of") identically, its layout set by the noise alone.
CASES = [
    ("a red circle above a blue square", "grey", {"top": "red", "bottom": "blue"}, 0),
    ("a red circle below a blue square", "grey", {"top": "blue", "bottom": "red"}, 0),
    ("a yellow square left of a purple circle", "grey", {"left": "yellow", "right": "purple"}, 1),
    ("a yellow square right of a purple circle", "grey", {"left": "purple", "right": "yellow"}, 1),
    ("a white triangle below a black circle", "grey", {"top": "black", "bottom": "white"}, 2),
    ("a green triangle on a yellow background", "yellow", {"all": "green"}, 3),
]
REGIONS = {"top": np.s_[:32, :], "bottom": np.s_[32:, :], "left": np.s_[:, :32],
           "right": np.s_[:, 32:], "all": np.s_[:, :]}


def classify(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] floats in [0, 1] -> [H, W] array of palette colour names (nearest in RGB)."""
    rgb = np.array(list(PALETTE.values()), dtype=np.float32) / 255.0      # [9, 3]
    dist = ((image[:, :, None, :] - rgb[None, None]) ** 2).sum(-1)        # [H, W, 9]
    return np.array(NAMES)[dist.argmin(-1)]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return FluxPipeline.from_pretrained(default_pipeline_path())


@pytest.fixture(scope="module")
def images(pipe):
    gens = [torch.Generator().manual_seed(c[3]) for c in CASES]
    return pipe([c[0] for c in CASES], generator=gens, **CALL).images        # [6, 64, 64, 3]


def test_shipped_directory_layout_and_size():
    root = default_pipeline_path()
    for part in ("model_index.json", "transformer/config.json", "vae/config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json",
                 "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json",
                 "scheduler/scheduler_config.json"):
        assert (root / part).is_file(), part
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"shipped pipeline is {size / 2**20:.1f} MiB"


def test_tokenizers_load_offline_with_transformers_classes():
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    root = default_pipeline_path()
    prompt = "a red circle left of a blue square on a yellow background"
    clip = CLIPTokenizer.from_pretrained(root / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(root / "tokenizer_2")
    assert AutoTokenizer.from_pretrained(root / "tokenizer")(prompt).input_ids == clip(prompt).input_ids
    assert AutoTokenizer.from_pretrained(root / "tokenizer_2")(prompt).input_ids == t5(prompt).input_ids
    # every word is one token: bos + 12 words + eos for CLIP, 12 words + eos for T5
    assert len(clip(prompt).input_ids) == 14 and len(t5(prompt).input_ids) == 13


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_named_colour_dominates_named_region(images, case):
    prompt, background, wanted, _ = CASES[case]
    labels = classify(images[case])
    assert (labels == background).mean() > 0.4, f"{prompt!r}: background {background} not dominant"
    for region, colour in wanted.items():
        part = labels[REGIONS[region]]
        fg = part[part != background]
        assert fg.size >= 40, f"{prompt!r}: almost nothing drawn in the {region} ({fg.size} px)"
        share = (fg == colour).mean()
        assert share > 0.6, f"{prompt!r}: {colour} is {share:.0%} of the {region}'s shape pixels"


def test_prompt_changes_the_image(images):
    # same seed, relation reversed: the two objects trade places
    assert np.abs(images[0] - images[1]).mean() > 0.05


def test_diffusers_loads_the_shipped_pipeline_and_draws_the_same(pipe):
    import diffusers

    ref = diffusers.FluxPipeline.from_pretrained(default_pipeline_path())
    prompt = CASES[0][0]
    ours = pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images
    theirs = ref(prompt, generator=torch.Generator().manual_seed(0), **CALL).images
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_the_pipelines_vae_switches_reach_its_vae_and_draw_in_tiles(pipe):
    """enable_vae_tiling / enable_vae_slicing (the shortcuts of diffusers' pipelines) switch the
    VAE's; with tiles of 32 pixels the 64 x 64 images are decoded in four blended tiles."""
    prompt = [CASES[0][0], CASES[1][0]]
    whole = pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images
    vae = pipe.vae
    sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
    try:
        pipe.enable_vae_tiling()
        pipe.enable_vae_slicing()
        assert vae.use_tiling and vae.use_slicing
        vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 32 // 8
        tiled = pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images
    finally:
        pipe.disable_vae_tiling()
        pipe.disable_vae_slicing()
        vae.tile_sample_min_size, vae.tile_latent_min_size = sizes
    assert not vae.use_tiling and not vae.use_slicing
    assert tiled.shape == whole.shape and 0 < np.abs(tiled - whole).mean() < 0.05  # faint seams
