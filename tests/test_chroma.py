"""ChromaTransformer2DModel and ChromaPipeline against diffusers 0.42.1, both ways on disk,
quantized with every backend, and the pipeline end to end on a tiny diffusers-built Chroma."""

import inspect
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
import torchao.quantization as tq
from PIL import Image

import diffquant.quantizers  # noqa: F401  (registers every backend present)
from diffquant import (AutoModel, ChromaPipeline, ChromaTransformer2DModel, ConfigError,
                       DiffusionPipeline, TorchAoConfig)
from diffquant.quantizers import AUTO_QUANTIZATION_CONFIG_MAPPING
from diffquant.quantizers.base import QuantizedLinear
from diffquant.quantizers.pipeline_config import PipelineQuantizationConfig
from tests.tiny_flux_siblings import CHROMA_CONFIG, build_tiny_chroma_pipeline_dir, randomize
from tests.tiny_pipeline import TINY_PROMPT


def _inputs(batch=2, height=3, width=4, text=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(height, width, 3)
    ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return dict(hidden_states=torch.randn(batch, height * width, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g).to(dtype),
                timestep=torch.tensor([0.25, 0.8])[:batch].to(dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3))


def _mask(kind, batch=2, text=5, image=12):
    """The pipeline's [B, T+S] mask: float as diffusers builds it, or bool."""
    if kind is None:
        return None
    lengths = torch.tensor([2, 4])[:batch]
    text_mask = (torch.arange(text)[None] <= lengths[:, None]).float()
    mask = torch.cat([text_mask, torch.ones(batch, image, dtype=torch.bool)], dim=1)
    return mask.bool() if kind == "bool" else mask


def _run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).sample


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """A random tiny Chroma transformer saved by diffusers (float32)."""
    directory = tmp_path_factory.mktemp("chroma")
    randomize(diffusers.ChromaTransformer2DModel(**CHROMA_CONFIG)).save_pretrained(directory)
    return directory


# -- the model ------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_loads_diffusers_checkpoint_bit_for_bit(ref_dir, mask):
    ref = diffusers.ChromaTransformer2DModel.from_pretrained(ref_dir).eval()
    ours = ChromaTransformer2DModel.from_pretrained(ref_dir)
    assert set(ours.state_dict()) == set(ref.state_dict())
    inputs = _inputs()
    expected = _run(ref, inputs, attention_mask=_mask(mask))
    assert torch.equal(_run(ours, inputs, attention_mask=_mask(mask)), expected)
    if mask == "bool":  # a bool mask drops the padding: other numbers than the float one's
        assert not torch.equal(expected, _run(ref, inputs, attention_mask=_mask("float")))
    (tup,) = ours(**inputs, attention_mask=_mask(mask), return_dict=False)
    assert torch.equal(tup, expected)


def test_saves_for_diffusers_and_loads_in_bf16(ref_dir, tmp_path):
    torch.manual_seed(0)
    ours = randomize(ChromaTransformer2DModel(**CHROMA_CONFIG), seed=3).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == \
        "ChromaTransformer2DModel"
    ref = diffusers.ChromaTransformer2DModel.from_pretrained(tmp_path).eval()
    inputs = _inputs()
    assert torch.equal(_run(ours, inputs, attention_mask=_mask("float")),
                       _run(ref, inputs, attention_mask=_mask("float")))
    bf16 = _inputs(dtype=torch.bfloat16)
    ref = diffusers.ChromaTransformer2DModel.from_pretrained(ref_dir, torch_dtype=torch.bfloat16)
    ours = ChromaTransformer2DModel.from_pretrained(ref_dir, torch_dtype=torch.bfloat16)
    got = _run(ours, bf16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, _run(ref, bf16))


def test_batched_ids_patch_size_and_out_channels(tmp_path):
    cfg = dict(CHROMA_CONFIG, patch_size=2, out_channels=4, num_single_layers=1)
    randomize(diffusers.ChromaTransformer2DModel(**cfg), seed=5).save_pretrained(tmp_path)
    ref = diffusers.ChromaTransformer2DModel.from_pretrained(tmp_path).eval()
    ours = AutoModel.from_pretrained(tmp_path)  # config.json's _class_name picks the class
    assert type(ours) is ChromaTransformer2DModel
    inputs = _inputs(batch=1)
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][None], inputs["txt_ids"][None]
    got = _run(ours, inputs)
    assert got.shape == (1, 12, 16) and torch.equal(got, _run(ref, inputs))


def test_bad_config_names_file_and_field(ref_dir, tmp_path):
    config = json.loads((ref_dir / "config.json").read_text())
    shutil.copy(ref_dir / "diffusion_pytorch_model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [4, 4, 4]}))
    with pytest.raises(ConfigError, match=r"config.json: cannot build ChromaTransformer2DModel.*"
                                          r"axes_dims_rope=\[4, 4, 4\] sums to 12"):
        ChromaTransformer2DModel.from_pretrained(tmp_path)


# -- quantized ------------------------------------------------------------------------------
def test_int8wo_equals_diffusers_torchao(ref_dir, tmp_path):
    bf16 = _inputs(dtype=torch.bfloat16)
    theirs = diffusers.ChromaTransformer2DModel.from_pretrained(
        ref_dir, torch_dtype=torch.bfloat16,
        quantization_config=diffusers.TorchAoConfig(tq.Int8WeightOnlyConfig()))
    ours = ChromaTransformer2DModel.from_pretrained(ref_dir, torch_dtype=torch.bfloat16,
                                                    quantization_config=TorchAoConfig("int8wo"))
    # the approximator is quantized too, as diffusers does
    assert isinstance(ours.distilled_guidance_layer.layers[0].linear_1, QuantizedLinear)
    y = _run(theirs, bf16, attention_mask=_mask("float").bfloat16())
    assert torch.equal(_run(ours, bf16, attention_mask=_mask("float").bfloat16()), y)
    theirs.save_pretrained(tmp_path)  # diffusers' torchao checkpoint loads to the same numbers
    back = ChromaTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(_run(back, bf16, attention_mask=_mask("float").bfloat16()), y)


# Widths every backend's blocks divide (GGUF 32, modelopt 16): x_embedder's 32 inputs included
WIDE = dict(CHROMA_CONFIG, in_channels=32, attention_head_dim=32, axes_dims_rope=(8, 12, 12),
            approximator_num_channels=32, approximator_hidden_dim=64)


def _every_backend():
    """One CPU example config per registered backend (the contract tests run all of them)."""
    seen, out = set(), []
    for key, cls in sorted(AUTO_QUANTIZATION_CONFIG_MAPPING.items()):
        if cls not in seen:
            seen.add(cls)
            config = cls.cpu_examples()[0]
            out.append(pytest.param(config, id=f"{key}-{config.bits}bit"))
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(bf16 checkpoint dir, inputs, unquantized output, its footprint)."""
    directory = tmp_path_factory.mktemp("wide")
    randomize(ChromaTransformer2DModel(**WIDE), seed=7, scale=0.05).to(torch.bfloat16).save_pretrained(directory)
    base = ChromaTransformer2DModel.from_pretrained(directory, torch_dtype=torch.bfloat16)
    inputs = _inputs(dtype=torch.bfloat16)
    inputs["hidden_states"] = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    inputs["hidden_states"] = inputs["hidden_states"].bfloat16()
    return directory, inputs, _run(base, inputs), base.get_memory_footprint()


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("config", _every_backend())
def test_every_backend_quantizes_saves_and_reloads(wide, config, tmp_path):
    """Every Linear is swapped (the approximator's too), the output is the format's error away
    from bf16 and within bf16 rounding of the dequantized weights' own output; the footprint
    shrinks; save and reload with no config give the same output bit for bit."""
    directory, inputs, ref, ref_bytes = wide
    model = ChromaTransformer2DModel.from_pretrained(directory, quantization_config=config,
                                                     torch_dtype=torch.bfloat16)
    assert isinstance(model.transformer_blocks[0].attn.to_q, QuantizedLinear)
    assert isinstance(model.distilled_guidance_layer.out_proj, QuantizedLinear)
    y = _run(model, inputs)
    bits = config.bits
    assert _rel_err(y, ref) < (0.1 if bits >= 8 else 0.35 if bits >= 4 else 0.9)
    assert model.get_memory_footprint() < (0.8 if bits >= 8 else 0.6) * ref_bytes
    model.save_pretrained(tmp_path)
    back = ChromaTransformer2DModel.from_pretrained(tmp_path)  # no config: from config.json
    assert back.is_quantized and torch.equal(_run(back, inputs), y)
    assert _rel_err(y, _run(back.dequantize(), inputs)) < 0.03


# -- the pipeline ---------------------------------------------------------------------------
CALL = dict(num_inference_steps=2, max_sequence_length=16, height=32, width=32, output_type="np")


def run(pipe, prompt=TINY_PROMPT, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_chroma_pipeline_dir(tmp_path_factory.mktemp("tiny") / "chroma")


@pytest.fixture(scope="module")
def ref_pipe(pipe_dir):
    return diffusers.ChromaPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def ours(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


@pytest.mark.parametrize("kw", [
    dict(),                                                           # CFG, negative prompt ""
    dict(guidance_scale=1.0),                                         # no CFG: one prediction a step
    dict(prompt=["a red circle", "blue"], negative_prompt=["dark", "blurry"],
         num_images_per_prompt=2, sigmas=[1.0, 0.6]),
])
def test_two_steps_equal_diffusers(ours, ref_pipe, kw):
    assert type(ours) is ChromaPipeline and isinstance(ours.transformer, ChromaTransformer2DModel)
    expected = run(ref_pipe, **kw)
    assert expected.std() > 0.01
    np.testing.assert_array_equal(run(ours, **kw), expected)


def test_call_signature_embeds_and_bool_masks(ours, ref_pipe):
    theirs = inspect.signature(type(ref_pipe).__call__).parameters
    assert list(inspect.signature(ChromaPipeline.__call__).parameters) == list(theirs)
    embeds, _, mask, neg, _, neg_mask = ours.encode_prompt(TINY_PROMPT, "dark", max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and mask.dtype == torch.float32
    assert mask[0].tolist() == [1.0] * int(mask[0].sum()) + [0.0] * (16 - int(mask[0].sum()))
    kw = dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=neg,
              prompt_attention_mask=mask.bool(), negative_prompt_attention_mask=neg_mask.bool())
    np.testing.assert_array_equal(run(ours, **kw), run(ref_pipe, **kw))
    with pytest.raises(ValueError, match="prompt_embeds needs prompt_attention_mask too"):
        run(ours, prompt=None, prompt_embeds=embeds)


def test_quantized_pipeline_equals_diffusers_and_reloads_bit_for_bit(pipe_dir, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ

    theirs = DiffusersPQ(quant_mapping={"transformer": diffusers.TorchAoConfig(
        tq.Int8WeightOnlyConfig())})
    ref = diffusers.ChromaPipeline.from_pretrained(pipe_dir, quantization_config=theirs,
                                                   torch_dtype=torch.bfloat16)
    # torchao's config object: its JSON is diffusers 0.42's (a name string writes 0.37's form)
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(
        tq.Int8WeightOnlyConfig())})
    pipe = ChromaPipeline.from_pretrained(pipe_dir, quantization_config=pq,
                                          torch_dtype=torch.bfloat16)
    image = run(pipe, guidance_scale=1.0)  # CFG's second prediction is tested unquantized
    np.testing.assert_array_equal(image, run(ref, guidance_scale=1.0))
    pipe.save_pretrained(tmp_path / "q")
    back = DiffusionPipeline.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)  # no config
    assert type(back) is ChromaPipeline and back.transformer.quantization_method == "torchao"
    np.testing.assert_array_equal(run(back, guidance_scale=1.0), image)


def test_diffusers_loads_what_diffquant_saves(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ChromaPipeline"
    assert index["transformer"] == ["diffusers", "ChromaTransformer2DModel"]
    theirs = diffusers.ChromaPipeline.from_pretrained(tmp_path)
    np.testing.assert_array_equal(run(theirs, guidance_scale=1.0), run(ours, guidance_scale=1.0))


def test_cli_quantize_inspect_generate(pipe_dir, tmp_path, capsys):
    from tests.test_cli import main_in_process

    dst = tmp_path / "q"
    assert main_in_process("quantize", pipe_dir, dst, "--quantize", "torchao:int8wo", "-q") == 0
    capsys.readouterr()
    assert main_in_process("inspect", dst, "-q") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae", "total"}
    assert rows["transformer"][1:3] == ["ChromaTransformer2DModel", "torchao"]
    out = tmp_path / "out.png"
    assert main_in_process("generate", "--model", dst, "--prompt", TINY_PROMPT, "--steps", 2,
                           "--max-sequence-length", 16, "--out", out, "-q") == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (32x32, 2 steps, seed 0, load ")
    assert np.asarray(Image.open(out)).std() > 1
