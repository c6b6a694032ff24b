"""Pipelines diffquant does not implement: diffusers' pipeline class with diffquant's components
(pipelines/diffusers_pipelines.py), on a tiny SD3 and a tiny Wan 2.1 pipeline saved by diffusers.

A two-step run equals diffusers' own pipeline quantized the same way; the saved folder reloads
in diffquant (same bits, no config) and, for the backend diffusers reads diffquant's files of
(quanto), in diffusers.
"""

import json

import numpy as np
import pytest
import torch

import diffquant
import diffusers
from diffquant import DiffusionPipeline, QuantoConfig, diffusers_class
from diffquant.errors import ConfigError
from diffquant.quantizers import PipelineQuantizationConfig
from diffquant.quantizers.base import QuantizedLinear
from tests.tiny_diffusers_pipelines import WAN_CALL
from tests.tiny_pipeline import TINY_PROMPT


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def run_sd3(pipe):
    return pipe(TINY_PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                max_sequence_length=16, output_type="np").images


def run_wan(pipe):
    return pipe(TINY_PROMPT, negative_prompt="blurry", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **WAN_CALL).frames


def _quantized(model) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_sd3_equals_diffusers_with_quanto_and_reloads_in_both(sd3_dir, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ

    ours = DiffusionPipeline.from_pretrained(sd3_dir, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"transformer": QuantoConfig("int8")}))
    assert isinstance(ours, diffusers.StableDiffusion3Pipeline)
    assert type(ours.transformer) is diffusers_class("SD3Transformer2DModel")
    assert type(ours.vae) is diffusers_class("AutoencoderKL")  # diffusers' VAE, not the native one
    assert _quantized(ours.transformer) and not _quantized(ours.vae)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_dir, quantization_config=DiffusersPQ(
        quant_mapping={"transformer": diffusers.QuantoConfig(weights_dtype="int8")}))
    image = run_sd3(ours)
    np.testing.assert_allclose(image, run_sd3(theirs), atol=1e-5, rtol=0)

    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["image_encoder"] == [None, None]
    back = DiffusionPipeline.from_pretrained(saved)
    assert back.transformer.quantization_method == "quanto"
    np.testing.assert_array_equal(run_sd3(back), image)
    in_diffusers = diffusers.StableDiffusion3Pipeline.from_pretrained(saved)
    assert type(in_diffusers.transformer) is diffusers.SD3Transformer2DModel
    assert type(in_diffusers.transformer.proj_out).__name__ == "QLinear"  # optimum-quanto's own
    np.testing.assert_allclose(run_sd3(in_diffusers), image, atol=1e-5, rtol=0)


def test_wan_equals_diffusers_with_torchao_and_reloads(wan_dir, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ
    from torchao.quantization import Int8WeightOnlyConfig

    ours = diffquant.WanPipeline.from_pretrained(
        wan_dir, torch_dtype=torch.bfloat16, quantization_config=PipelineQuantizationConfig(
            quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
            components_to_quantize=["transformer"]))
    assert isinstance(ours, diffusers.WanPipeline) and _quantized(ours.transformer)
    assert ours.transformer_2 is None
    theirs = diffusers.WanPipeline.from_pretrained(
        wan_dir, torch_dtype=torch.bfloat16, quantization_config=DiffusersPQ(
            quant_mapping={"transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig())}))
    frames = run_wan(ours)
    assert frames.shape == (1, WAN_CALL["num_frames"], 16, 16, 3)
    np.testing.assert_allclose(frames, run_wan(theirs), atol=1e-5, rtol=0)

    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    # the pipeline's options are kept beside its components, as diffusers writes them
    assert index["expand_timesteps"] is False and index["boundary_ratio"] is None
    back = DiffusionPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16)  # VAE, text encoder
    assert type(back) is type(ours) and back.transformer.quantization_method == "torchao"
    np.testing.assert_array_equal(run_wan(back), frames)


def test_pipeline_errors_name_the_file_and_entry(wan_dir, tmp_path):
    index = json.loads((wan_dir / "model_index.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "NoSuchModel"]}))
    with pytest.raises(ConfigError, match=r"model_index.json: key 'transformer' names class "
                                          r"'NoSuchModel', which diffusers .* does not have"):
        DiffusionPipeline.from_pretrained(broken)
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    with pytest.raises(ConfigError, match=r"'NoSuchPipeline' is neither a class diffquant "
                                          r"implements nor a diffusers .* DiffusionPipeline class"):
        DiffusionPipeline.from_pretrained(broken)
    with pytest.raises(TypeError, match=r"WanPipeline.from_pretrained: unknown arguments \['unet'\]"):
        DiffusionPipeline.from_pretrained(wan_dir, unet=None)
