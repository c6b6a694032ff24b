"""DiffusionPipeline / FluxPipeline against diffusers 0.42.1 on a tiny diffusers-built pipeline."""

import json
import logging
import shutil

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffquant import CheckpointError, ConfigError, DiffusionPipeline, FluxPipeline
from diffquant.models.autoencoder_kl import AutoencoderKL
from diffquant.models.transformer_flux import FluxTransformer2DModel
from diffquant.quantizers.pipeline_config import PipelineQuantizationConfig
from tests.tiny_pipeline import TINY_PROMPT, build_tiny_flux_pipeline_dir

CALL = dict(num_inference_steps=2, max_sequence_length=32, height=32, width=32, output_type="np")


def run(pipe, prompt=TINY_PROMPT, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_flux_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def ref_pipe(pipe_dir):
    return diffusers.FluxPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def ours(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def ref_image(ref_pipe):
    return run(ref_pipe)


def test_diffusers_pipeline_loads_with_diffusers_images(ours, pipe_dir, ref_image):
    assert type(ours) is FluxPipeline
    assert isinstance(ours.transformer, FluxTransformer2DModel)
    assert isinstance(ours.vae, AutoencoderKL) and ours.image_encoder is None
    assert ref_image.shape == (1, 32, 32, 3) and ref_image.std() > 0.01
    np.testing.assert_allclose(run(ours), ref_image, atol=1e-4, rtol=0)
    direct = FluxPipeline.from_pretrained(pipe_dir)
    np.testing.assert_allclose(run(direct), ref_image, atol=1e-4, rtol=0)


def test_batch_sigmas_and_true_cfg_match_diffusers(ours, ref_pipe):
    kw = dict(num_images_per_prompt=2, sigmas=[1.0, 0.7, 0.3], guidance_scale=5.0,
              negative_prompt=["blurry", "dark"], true_cfg_scale=2.0)
    prompts = ["a red circle", "blue square"]
    a, b = run(ref_pipe, prompts, **kw), run(ours, prompts, **kw)
    assert b.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_call_takes_every_argument_diffusers_takes(ours, ref_pipe, ref_image, caplog):
    """A diffusers call runs unchanged: the same parameter names; joint_attention_kwargs'
    "scale" (LoRA's, a no-op without one) taken, its other keys (attention processors')
    ignored with a warning, the same image as diffusers'; IP-Adapter inputs refused by name
    (no image encoder)."""
    import inspect

    theirs = inspect.signature(type(ref_pipe).__call__).parameters
    assert set(inspect.signature(FluxPipeline.__call__).parameters) == set(theirs)
    with caplog.at_level(logging.WARNING):
        image = run(ours, joint_attention_kwargs={"scale": 1.0, "ip_adapter_masks": None})
    np.testing.assert_allclose(image, ref_image, atol=1e-4, rtol=0)
    assert "joint_attention_kwargs ['ip_adapter_masks'] are ignored" in caplog.text
    with pytest.raises(ValueError, match="FluxPipeline: ip_adapter_image given, but diffquant's "
                                         "FluxPipeline has no IP-Adapter"):
        run(ours, ip_adapter_image=np.zeros((8, 8, 3), np.uint8))


def test_a_transformer_in_another_dtype_than_the_rest(pipe_dir, ours, ref_image):
    """torch_dtype={"transformer": bf16, "default": float32}, or a bf16-quantized transformer in
    a float32 pipeline: diffusers fails on the transformer's first product (float32 inputs,
    bf16 weights); here the transformer gets its dtype's inputs, the latents and the VAE stay
    float32, and the image is the float32 one within the bf16 transformer's rounding."""
    mixed = FluxPipeline.from_pretrained(pipe_dir, torch_dtype={"transformer": torch.bfloat16,
                                                                "default": torch.float32})
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.vae.dtype == torch.float32
    image = run(mixed)
    assert image.dtype == np.float32 and 0 < np.abs(image - ref_image).max() < 0.05
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        run(diffusers.FluxPipeline.from_pretrained(
            pipe_dir, torch_dtype={"transformer": torch.bfloat16, "default": torch.float32}))
    from diffquant import QuantoConfig
    quantized = FluxTransformer2DModel.from_pretrained(
        pipe_dir, subfolder="transformer", quantization_config=QuantoConfig(weights_dtype="int8"),
        torch_dtype=torch.bfloat16)
    image = run(FluxPipeline.from_pretrained(pipe_dir, transformer=quantized))
    assert 0 < np.abs(image - ref_image).max() < 0.05


def test_diffusers_loads_what_diffquant_saves(ours, ref_image, tmp_path):
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["image_encoder"] == [None, None] and index["_class_name"] == "FluxPipeline"
    back = diffusers.FluxPipeline.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(run(back), ref_image, atol=1e-4, rtol=0)
    again = FluxPipeline.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(run(again), run(ours))


def test_sharded_variant_save_reloads(ours, tmp_path):
    ours.save_pretrained(tmp_path / "s", variant="fp32", max_shard_size="20KB")
    shards = (tmp_path / "s" / "transformer").glob("diffusion_pytorch_model.fp32-000*-of-*.safetensors")
    assert len(list(shards)) > 1
    assert (tmp_path / "s" / "vae" / "diffusion_pytorch_model.safetensors.index.fp32.json").is_file()
    back = DiffusionPipeline.from_pretrained(tmp_path / "s", variant="fp32")
    np.testing.assert_array_equal(run(back), run(ours))
    theirs = diffusers.FluxPipeline.from_pretrained(tmp_path / "s", variant="fp32")
    np.testing.assert_allclose(run(theirs), run(ours), atol=1e-4, rtol=0)


def test_loads_diffusers_sharded_variant(ref_pipe, ours, tmp_path):
    # regression: variant shards are x.fp32-00001-of-N.safetensors + x.safetensors.index.fp32.json
    ref_pipe.transformer.save_pretrained(tmp_path / "t", variant="fp32", max_shard_size="20KB")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.fp32.json").is_file()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "t", variant="fp32")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), ours.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_prompt_list_and_images_per_prompt_shapes(ours):
    assert run(ours, ["a", "b", "c"], num_images_per_prompt=2).shape == (6, 32, 32, 3)
    assert run(ours, ["a"], height=64, width=48).shape == (1, 64, 48, 3)


def test_prompt_embeds_path_gives_same_images(ours, ref_image):
    embeds, pooled, _ = ours.encode_prompt(TINY_PROMPT, max_sequence_length=32)
    assert embeds.shape == (1, 32, 32) and pooled.shape == (1, 32)
    got = ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
               generator=torch.Generator().manual_seed(0), **CALL).images
    np.testing.assert_allclose(got, ref_image, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=embeds, **CALL)
    with pytest.raises(ValueError, match="not both"):
        ours(TINY_PROMPT, prompt_embeds=embeds, pooled_prompt_embeds=pooled, **CALL)


def test_output_types(ours, ref_image):
    pil = run(ours, output_type="pil")
    assert isinstance(pil, list) and isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil[0]), (ref_image[0] * 255).round().astype("uint8"))
    pt = run(ours, output_type="pt")
    assert pt.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), ref_image, atol=1e-4, rtol=0)
    latent = run(ours, output_type="latent")
    assert latent.shape == (1, 64, 16)
    out = ours(TINY_PROMPT, generator=torch.Generator().manual_seed(0), return_dict=False, **CALL)
    assert isinstance(out, tuple) and out[0].shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="output_type='jpeg'"):
        run(ours, output_type="jpeg")


def test_model_cpu_offload_gives_same_images(pipe_dir, ref_image):
    pipe = FluxPipeline.from_pretrained(pipe_dir)
    pipe.enable_model_cpu_offload()
    accelerator = torch.accelerator.current_accelerator()
    expected = torch.device("cpu") if accelerator is None else torch.device(accelerator.type, 0)
    assert pipe._execution_device == expected
    np.testing.assert_allclose(run(pipe), ref_image, atol=1e-4, rtol=0)
    assert all(m.device.type == "cpu" for _, m in pipe._modules())  # freed after the call
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(run(pipe), ref_image, atol=1e-4, rtol=0)
    pipe.remove_all_hooks()
    assert pipe._execution_device == torch.device("cpu")


def test_to_components_device_dtype(pipe_dir):
    pipe = FluxPipeline.from_pretrained(pipe_dir, torch_dtype={"transformer": torch.bfloat16})
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert set(pipe.components) >= {"transformer", "vae", "text_encoder", "tokenizer_2", "scheduler"}
    pipe.transformer.is_quantized = True  # stands in for a quantized component: never cast
    pipe.to(torch.float16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float16
    pipe.to("cpu")
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float16


def test_component_override(pipe_dir, ours):
    vae = ours.vae
    pipe = FluxPipeline.from_pretrained(pipe_dir, vae=vae, image_encoder=None)
    assert pipe.vae is vae


# -- errors -------------------------------------------------------------------------------------
def _copy_with_index(pipe_dir, tmp_path, edit):
    target = tmp_path / "pipe"
    shutil.copytree(pipe_dir, target)
    index = json.loads((target / "model_index.json").read_text())
    edit(index, target)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def test_missing_component_folder(pipe_dir, tmp_path):
    path = _copy_with_index(pipe_dir, tmp_path, lambda i, t: shutil.rmtree(t / "vae"))
    with pytest.raises(CheckpointError, match=r"model_index\.json: component 'vae' \(AutoencoderKL\) "
                                              r"has no folder .*vae"):
        DiffusionPipeline.from_pretrained(path)


def test_unknown_library_and_class(pipe_dir, tmp_path):
    path = _copy_with_index(pipe_dir, tmp_path,
                            lambda i, t: i.update(scheduler=["mylib", "MyScheduler"]))
    with pytest.raises(ConfigError, match=r"model_index\.json: key 'scheduler' names library 'mylib'"):
        DiffusionPipeline.from_pretrained(path)
    (path / "model_index.json").write_text(json.dumps(
        {**json.loads((path / "model_index.json").read_text()),
         "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(ConfigError, match=r"key 'scheduler' names class 'DDIMScheduler' of library "
                                          r"'diffusers', which diffquant does not implement"):
        FluxPipeline.from_pretrained(path)
    (path / "model_index.json").write_text(json.dumps(
        {**json.loads((path / "model_index.json").read_text()),
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
         "text_encoder": ["transformers", "NoSuchModel"]}))
    with pytest.raises(ConfigError, match="key 'text_encoder' names class 'NoSuchModel', which "
                                          "transformers"):
        FluxPipeline.from_pretrained(path)


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/b", "..", "x\\y"])
def test_component_name_must_be_plain_folder(pipe_dir, tmp_path, name):
    path = _copy_with_index(pipe_dir, tmp_path,
                            lambda i, t: i.update({name: ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ConfigError, match=r"model_index\.json: component key .* is not a plain "
                                          "folder name"):
        DiffusionPipeline.from_pretrained(path)


def test_unknown_pipeline_class_and_missing_index(pipe_dir, tmp_path):
    # any diffusers pipeline class loads (tests/test_diffusers_pipelines.py); another name not
    path = _copy_with_index(pipe_dir, tmp_path, lambda i, t: i.update(_class_name="NoSuchPipeline"))
    with pytest.raises(ConfigError, match=r"model_index\.json: 'NoSuchPipeline' is neither a class "
                                          r"diffquant implements nor a diffusers"):
        DiffusionPipeline.from_pretrained(path)
    (path / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model_index\.json: pipeline index file not found"):
        DiffusionPipeline.from_pretrained(path)


def test_required_component_missing_from_index(pipe_dir, tmp_path):
    path = _copy_with_index(pipe_dir, tmp_path, lambda i, t: i.pop("transformer"))
    with pytest.raises(ConfigError, match="needs component 'transformer'.*pass transformer="):
        FluxPipeline.from_pretrained(path)


def test_quantization_config_must_be_pipeline_config(pipe_dir):
    with pytest.raises(ValueError, match="takes a PipelineQuantizationConfig, got dict"):
        DiffusionPipeline.from_pretrained(pipe_dir, quantization_config={"quant_method": "torchao"})


def test_quantization_config_resolved_per_module_component(pipe_dir, monkeypatch, caplog):
    from transformers import BitsAndBytesConfig as TfBnb

    pq = PipelineQuantizationConfig(quant_mapping={"transformer": TfBnb(load_in_8bit=True),
                                                   "unet": TfBnb(load_in_8bit=True)})
    calls, sentinel, seen = [], object(), {}
    monkeypatch.setattr(pq, "_resolve_quant_config", lambda is_diffusers, module_name: (
        calls.append((module_name, is_diffusers)) or (sentinel if module_name == "transformer" else None)))
    real = FluxTransformer2DModel.from_pretrained.__func__

    def fake_load(cls, path, quantization_config=None, **kw):
        seen["config"] = quantization_config
        return real(cls, path, **kw)

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", classmethod(fake_load))
    with caplog.at_level(logging.WARNING):
        DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=pq)
    assert sorted(calls) == [("text_encoder", False), ("text_encoder_2", False),
                             ("transformer", True), ("vae", True)]
    assert seen["config"] is sentinel
    assert "quantization_config names component 'unet'" in caplog.text


# -- atomic save --------------------------------------------------------------------------------
def test_failed_save_leaves_previous_pipeline(ours, pipe_dir, tmp_path, monkeypatch):
    target = tmp_path / "out"
    ours.save_pretrained(target)
    before = run(FluxPipeline.from_pretrained(target))

    other = FluxPipeline.from_pretrained(build_tiny_flux_pipeline_dir(tmp_path / "other", seed=5))

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(AutoencoderKL, "write_into", broken)  # transformer/ is already written
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # no temp leftovers
    np.testing.assert_array_equal(run(FluxPipeline.from_pretrained(target)), before)


def test_save_refuses_pickle(ours, tmp_path):
    with pytest.raises(ValueError, match="safe_serialization=False"):
        ours.save_pretrained(tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


# -- quantization end to end --------------------------------------------------------------------
def test_quantized_pipeline_runs_saves_and_reloads(pipe_dir, ours, ref_image, tmp_path):
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize=["transformer"])
    pipe = FluxPipeline.from_pretrained(pipe_dir, quantization_config=pq)
    assert pipe.transformer.is_quantized and not pipe.vae.is_quantized
    assert pipe.transformer.get_memory_footprint() < ours.transformer.get_memory_footprint()
    image = run(pipe)
    assert np.abs(image - ref_image).max() < 0.05  # int8 weights: close, not equal
    pipe.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    back = DiffusionPipeline.from_pretrained(tmp_path / "q")  # detected from config.json
    assert back.transformer.is_quantized
    np.testing.assert_array_equal(run(back), image)
    back.to(torch.bfloat16)  # the quantized transformer keeps its layout
    assert back.vae.dtype == torch.bfloat16 and back.transformer.is_quantized


def test_auto_model_loads_the_class_its_config_names(pipe_dir, tmp_path):
    """diffusers' quantization pages load components with AutoModel.from_pretrained(...,
    subfolder=...): the same call gives diffquant's class of config.json's _class_name, with
    every argument passed on."""
    from diffquant import AutoModel, TorchAoConfig

    model = AutoModel.from_pretrained(pipe_dir, subfolder="transformer",
                                      quantization_config=TorchAoConfig("int8wo"),
                                      torch_dtype=torch.bfloat16)
    direct = FluxTransformer2DModel.from_pretrained(pipe_dir, subfolder="transformer",
                                                    quantization_config=TorchAoConfig("int8wo"),
                                                    torch_dtype=torch.bfloat16)
    assert type(model) is FluxTransformer2DModel and model.quantization_method == "torchao"
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert type(AutoModel.from_pretrained(pipe_dir, subfolder="vae")) is AutoencoderKL
    with pytest.raises(CheckpointError, match=r"scheduler/config.json: model config file not found"):
        AutoModel.from_pretrained(pipe_dir, subfolder="scheduler")   # a scheduler is no model
    # a class diffquant does not implement is diffusers' (tests/test_diffusers_families.py);
    # a name neither has is refused with the file named
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuch2DModel"}))
    with pytest.raises(ConfigError, match=r"config.json: 'NoSuch2DModel' is neither a class "
                                          r"diffquant implements nor a diffusers"):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="AutoModel is not instantiated"):
        AutoModel()
