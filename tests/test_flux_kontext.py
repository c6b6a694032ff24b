"""FluxKontextPipeline against diffusers 0.42.1 on a tiny diffusers-built Kontext pipeline:
the reference image's resizing and preprocessing, two-step runs with an input image, true CFG,
quantized save and reload."""

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch
import torchao.quantization as tq
from PIL import Image

from diffquant import DiffusionPipeline, FluxKontextPipeline, FluxPipeline, TorchAoConfig
from diffquant.pipelines.flux_kontext import (PREFERRED_KONTEXT_RESOLUTIONS, preprocess_image,
                                              reference_size)
from diffquant.quantizers.pipeline_config import PipelineQuantizationConfig
from tests.tiny_flux_siblings import build_tiny_kontext_pipeline_dir
from tests.tiny_pipeline import TINY_PROMPT

# 32 x 32 output (max_area) and the image at its own size: tiny, unlike Kontext's ~1 MP default
CALL = dict(num_inference_steps=2, max_sequence_length=16, max_area=32 * 32, _auto_resize=False,
            output_type="np")


def picture(width=32, height=32, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def run(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": TINY_PROMPT, "image": picture(), **CALL, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_kontext_pipeline_dir(tmp_path_factory.mktemp("tiny") / "kontext")


@pytest.fixture(scope="module")
def ref_pipe(pipe_dir):
    return diffusers.FluxKontextPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def ours(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


def diffusers_reference_image(pipe, image, auto_resize):
    """diffusers' FluxKontextPipeline.__call__ step 3 (preprocess image), line for line."""
    multiple_of = pipe.vae_scale_factor * 2
    img = image[0] if isinstance(image, list) else image
    image_height, image_width = pipe.image_processor.get_default_height_width(img)
    aspect_ratio = image_width / image_height
    if auto_resize:
        _, image_width, image_height = min(
            (abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    image_width = image_width // multiple_of * multiple_of
    image_height = image_height // multiple_of * multiple_of
    image = pipe.image_processor.resize(image, image_height, image_width)
    return pipe.image_processor.preprocess(image, image_height, image_width)


@pytest.mark.parametrize("image, auto_resize", [
    (picture(36, 20), True),                                # -> the nearest Kontext resolution
    (picture(38, 21), False),                               # -> rounded down to 4s: 36 x 20
    ([picture(20, 40, 1), picture(40, 40, 2)], True),       # a list: the first one's ratio
    (np.random.RandomState(3).rand(2, 24, 40, 3).astype(np.float32), True),
    (torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(4)), False),
])
def test_reference_image_resized_and_scaled_as_diffusers(ref_pipe, image, auto_resize):
    expected = diffusers_reference_image(ref_pipe, image, auto_resize)
    height, width = reference_size(image, ref_pipe.vae_scale_factor * 2, auto_resize)
    got = preprocess_image(image, height, width)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_image_errors():
    with pytest.raises(ValueError, match=r"image: 12 x 40 pixels; Kontext needs at least 16 x 16"):
        reference_size(picture(12, 40), 16, True)
    with pytest.raises(ValueError, match=r"image: got a Tensor of 3 dims; expected a PIL image"):
        preprocess_image(torch.rand(3, 8, 8), 8, 8)


@pytest.mark.parametrize("kw", [
    dict(),                                                             # PIL image, 32 x 32
    dict(negative_prompt="dark", true_cfg_scale=2.0, guidance_scale=2.5),  # true CFG
    dict(image=None, height=64, width=32),                              # text to image, 2:1
    dict(prompt=["a red circle", "blue"], num_images_per_prompt=2,      # one image for 4
         image=torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(4))),
])
def test_two_steps_equal_diffusers(ours, ref_pipe, kw):
    assert type(ours) is FluxKontextPipeline and isinstance(ours, FluxPipeline)
    expected = run(ref_pipe, **kw)
    assert expected.std() > 0.01
    got = run(ours, **kw)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # as Flux: float rounding


def test_the_image_changes_the_output_and_latents_go_in_as_they_are(ours):
    plain = run(ours)
    assert np.abs(run(ours, image=picture(seed=9)) - plain).max() > 1e-4
    pixels = preprocess_image(picture(), 32, 32)
    latents = ours._encode_vae_image(pixels, None)                      # [1, 4, 16, 16]
    np.testing.assert_array_equal(run(ours, image=latents), plain)


def test_call_signature_is_diffusers(ref_pipe):
    theirs = inspect.signature(type(ref_pipe).__call__).parameters
    assert list(inspect.signature(FluxKontextPipeline.__call__).parameters) == list(theirs)


def test_quantized_pipeline_equals_diffusers_and_reloads_bit_for_bit(pipe_dir, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ

    theirs = DiffusersPQ(quant_mapping={"transformer": diffusers.TorchAoConfig(
        tq.Int8WeightOnlyConfig())})
    ref = diffusers.FluxKontextPipeline.from_pretrained(pipe_dir, quantization_config=theirs,
                                                        torch_dtype=torch.bfloat16)
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig("int8wo")})
    pipe = FluxKontextPipeline.from_pretrained(pipe_dir, quantization_config=pq,
                                               torch_dtype=torch.bfloat16)
    image = run(pipe)
    np.testing.assert_array_equal(image, run(ref))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    back = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)  # no config
    assert type(back) is FluxKontextPipeline and back.transformer.quantization_method == "torchao"
    np.testing.assert_array_equal(run(back), image)


def test_cli_generate_takes_an_input_image(pipe_dir, ours, tmp_path, capsys):
    """--image reaches the pipeline; at the tiny pipeline's 32 x 32 (its VAE's sample_size) the
    image is brought to the output's area, not to Kontext's ~1 MP resolutions."""
    from tests.test_cli import main_in_process

    picture(48, 40, seed=5).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main_in_process("generate", "--model", pipe_dir, "--image", tmp_path / "in.png",
                           "--prompt", TINY_PROMPT, "--steps", 2, "--max-sequence-length", 16,
                           "--out", out, "-q") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (32x32, 2 steps, seed 0, load ")
    direct = ours(prompt=TINY_PROMPT, image=picture(48, 40, seed=5).resize((32, 28), Image.LANCZOS),
                  _auto_resize=False, max_area=32 * 32, height=32, width=32, num_inference_steps=2,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(direct))
    assert main_in_process("generate", "--image", tmp_path / "missing.png", "--prompt", "x") == 2
    assert "--image " in capsys.readouterr().err
