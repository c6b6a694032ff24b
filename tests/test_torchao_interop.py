"""torchao checkpoints move both ways between diffquant and diffusers 0.42.1: diffquant writes the
files diffusers writes (config, keys, safetensors metadata, bytes), diffusers loads them to the
same outputs, and diffquant reads diffusers' files, its own, and its older 0.37-form saves."""

import json
import logging

import diffusers
import numpy as np
import pytest
import torch
import torchao.quantization as tq
from safetensors import safe_open

from diffquant import FluxPipeline, FluxTransformer2DModel, TorchAoConfig
from diffquant.quantizers import DiffusersAutoQuantizer, PipelineQuantizationConfig
from tests.test_torchao import _flux_inputs, _run, save_random_flux
from tests.tiny_pipeline import TINY_PROMPT, build_tiny_flux_pipeline_dir
from tests.toy import DiffusersToyModel, ToyModel, save_toy, toy_input

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = "diffusion_pytorch_model.safetensors"

# diffquant's scheme name -> the torchao config diffusers 0.42 is given for it
SCHEMES = {"int8wo": tq.Int8WeightOnlyConfig(),
           "int8dq": tq.Int8DynamicActivationInt8WeightConfig(),
           "float8wo_e4m3": tq.Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn),
           "float8wo": tq.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2)}


def _file(directory):
    """({key: tensor}, metadata) of a one-file safetensors checkpoint."""
    with safe_open(directory / WEIGHTS, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _quantization_config(directory):
    return json.loads((directory / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_random_flux(tmp_path_factory.mktemp("flux"))


def test_a_scheme_name_is_the_torchao_config_diffusers_writes():
    for name, obj in SCHEMES.items():
        assert TorchAoConfig(name) == TorchAoConfig(obj)
        assert TorchAoConfig(name).to_dict() == json.loads(json.dumps(diffusers.TorchAoConfig(obj).to_dict()))
    assert TorchAoConfig("int8wo", set_inductor_config=False).as_torchao_config().set_inductor_config is False
    assert TorchAoConfig("int4wo", group_size=64).as_torchao_config() is None  # keeps 0.37's form


@pytest.mark.parametrize("name", list(SCHEMES))
def test_diffquant_writes_what_diffusers_writes_and_both_load_it(flux_dir, tmp_path, name):
    ours = FluxTransformer2DModel.from_pretrained(flux_dir, torch_dtype=torch.bfloat16,
                                                  quantization_config=TorchAoConfig(name))
    ours.save_pretrained(tmp_path / "dq")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(
        flux_dir, torch_dtype=torch.bfloat16, quantization_config=diffusers.TorchAoConfig(SCHEMES[name]))
    theirs.save_pretrained(tmp_path / "diffusers")
    # the same file: config, keys, dtypes, bytes and torchao's per-tensor metadata
    assert _quantization_config(tmp_path / "dq") == _quantization_config(tmp_path / "diffusers")
    (mine, my_meta), (ref, ref_meta) = _file(tmp_path / "dq"), _file(tmp_path / "diffusers")
    assert "x_embedder._weight_qdata" in mine and "x_embedder.weight" not in mine
    assert my_meta == ref_meta and list(mine) == list(ref)
    for key, value in ref.items():
        assert value.dtype == mine[key].dtype and torch.equal(value.view(torch.uint8),
                                                              mine[key].view(torch.uint8)), key
    inputs = _flux_inputs()
    y = _run(ours, inputs)
    loaded_by_diffusers = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "dq")
    assert type(loaded_by_diffusers.x_embedder.weight).__name__ in ("Int8Tensor", "Float8Tensor")
    assert torch.equal(_run(loaded_by_diffusers, inputs), y)  # the same integers, scales and ops
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "dq")  # detected from config.json
    assert again.hf_quantizer.pre_quantized and again.config.quantization_config == TorchAoConfig(name)
    assert torch.equal(_run(again, inputs), y)
    assert torch.equal(_run(FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers"), inputs), y)


def test_sharded_float32_model_without_biases_loads_in_diffusers(tmp_path):
    save_toy(tmp_path / "fp32", dtype=torch.float32)  # proj_out has no bias
    config = TorchAoConfig("int8wo", modules_to_not_convert=["blocks.1"])
    ours = ToyModel.from_pretrained(tmp_path / "fp32", torch_dtype=torch.float32, quantization_config=config)
    ours.save_pretrained(tmp_path / "dq", max_shard_size="40KB")
    index = json.loads((tmp_path / "dq" / f"{WEIGHTS}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads(index["metadata"]["proj_out.weight"])["_data"]["dtype"]["_data"] == "float32"
    assert "proj_out._weight_qdata" in index["weight_map"] and "proj_out.bias" not in index["weight_map"]
    x = toy_input(dtype=torch.float32)
    assert json.loads(index["metadata"]["blocks.1.weight"]) == {"_type": "Tensor"}
    theirs = DiffusersToyModel.from_pretrained(tmp_path / "dq", torch_dtype=torch.float32)
    assert type(theirs.blocks[1].weight) is torch.nn.Parameter and theirs.blocks[1].weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
        assert torch.equal(ToyModel.from_pretrained(tmp_path / "dq")(x), ours(x))


def test_old_form_still_loads_and_is_written_without_torchao(tmp_path, monkeypatch, caplog):
    """diffquant's saves before diffusers 0.42's form (and its saves where torchao is missing):
    a scheme name and plain keys. They reload bit for bit; saved again, they take the 0.42 form."""
    save_toy(tmp_path / "bf16")
    x = toy_input()
    model = ToyModel.from_pretrained(tmp_path / "bf16", quantization_config=TorchAoConfig("int8dq"))
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(TorchAoConfig, "as_torchao_config", lambda self: None)  # as without torchao
        model.save_pretrained(tmp_path / "old")
    assert "torchao is not installed: saving torchao int8dq in diffusers 0.37's form" in caplog.text
    assert _quantization_config(tmp_path / "old") == {"quant_method": "torchao", "quant_type": "int8dq",
                                                      "quant_type_kwargs": {}, "modules_to_not_convert": None}
    tensors, metadata = _file(tmp_path / "old")
    assert tensors["blocks.0.weight"].dtype == torch.int8 and "blocks.0.weight_scale" in tensors
    assert metadata == {"format": "pt"}
    old = ToyModel.from_pretrained(tmp_path / "old")
    with torch.no_grad():
        assert torch.equal(old(x), model(x))
    old.save_pretrained(tmp_path / "new")
    assert "blocks.0._weight_qdata" in _file(tmp_path / "new")[0]
    with torch.no_grad():
        assert torch.equal(DiffusersToyModel.from_pretrained(tmp_path / "new")(x), model(x))


def test_int4_keeps_the_037_form(tmp_path):
    save_toy(tmp_path / "bf16")
    config = TorchAoConfig("int4wo", group_size=64)
    ToyModel.from_pretrained(tmp_path / "bf16", quantization_config=config).save_pretrained(tmp_path / "q")
    assert DiffusersAutoQuantizer.from_dict(_quantization_config(tmp_path / "q")) == config
    tensors, metadata = _file(tmp_path / "q")
    assert {k for k in tensors if k.startswith("blocks.0.")} == {
        "blocks.0.weight", "blocks.0.weight_scale", "blocks.0.weight_zero", "blocks.0.bias"}
    assert metadata == {"format": "pt"}


def test_quantized_flux_pipeline_saved_by_diffquant_runs_in_diffusers(tmp_path):
    pipe_dir = build_tiny_flux_pipeline_dir(tmp_path / "pipe")
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize=["transformer"])
    ours = FluxPipeline.from_pretrained(pipe_dir, quantization_config=pq)
    ours.save_pretrained(tmp_path / "saved")
    theirs = diffusers.FluxPipeline.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert type(theirs.transformer.x_embedder.weight).__name__ == "Int8Tensor"

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(TINY_PROMPT, num_inference_steps=2, max_sequence_length=32, height=32, width=32,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    np.testing.assert_allclose(run(theirs), run(ours), atol=1e-4, rtol=0)  # test_pipeline's tolerance
