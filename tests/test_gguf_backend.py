"""GGUF backend on the toy model: config data, quantize-on-load, save/reload, dequantize, errors."""

import json

import pytest
import torch

from diffquant import GGUFQuantizationConfig
from diffquant.errors import CheckpointError, ConfigError, QuantizationError
from diffquant.quantizers import DiffusersAutoQuantizer
from diffquant.quantizers.gguf import GGUFLinear, GGUFQuantizer
from tests.toy import ToyModel, gguf_reference, save_toy, toy_input


def test_config_round_trip_and_defaults():
    c = GGUFQuantizationConfig()
    assert c.compute_dtype == torch.float32 and c.quant_type is None  # diffusers' defaults
    for c in GGUFQuantizationConfig.cpu_examples() + [GGUFQuantizationConfig("bfloat16", 8, ["proj_out"])]:
        d = json.loads(c.to_json_string())
        assert isinstance(d["compute_dtype"], str) and d["quant_method"] == "gguf"
        assert GGUFQuantizationConfig.from_dict(d) == c
        assert isinstance(DiffusersAutoQuantizer.from_config(d), GGUFQuantizer)
    assert GGUFQuantizationConfig("bfloat16", 8).quant_type == "Q8_0"
    # diffusers' dict carries pre_quantized; accepted and dropped
    assert GGUFQuantizationConfig.from_dict({"quant_method": "gguf", "compute_dtype": "float16",
                                             "pre_quantized": True}).compute_dtype == torch.float16
    assert GGUFQuantizationConfig("bfloat16", "Q8_0") != GGUFQuantizationConfig("bfloat16", "Q4_0")


def test_config_errors():
    with pytest.raises(ConfigError, match=r"quant_type='Q3_K': expected None .* or one of"):
        GGUFQuantizationConfig(quant_type="Q3_K")
    with pytest.raises(ConfigError, match=r"compute_dtype=torch.int8: expected a float dtype"):
        GGUFQuantizationConfig(torch.int8)
    with pytest.raises(ConfigError, match=r"compute_dtype='fp99': expected a torch dtype"):
        GGUFQuantizationConfig("fp99")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'bits'"):
        GGUFQuantizationConfig.from_dict({"quant_method": "gguf", "bits": 4})


@pytest.mark.parametrize("config", GGUFQuantizationConfig.cpu_examples(), ids=lambda c: c.quant_type)
def test_quantize_on_load_save_reload(tmp_path, config):
    ref = save_toy(tmp_path / "bf16")
    model = ToyModel.from_pretrained(tmp_path / "bf16", quantization_config=config,
                                     torch_dtype=torch.bfloat16)
    assert isinstance(model.proj_in, GGUFLinear) and model.proj_in.qtype.name == config.quant_type
    assert model.proj_in.weight.dtype == torch.uint8 and model.proj_in.weight_qtype.dtype == torch.int32
    x = toy_input(rows=80)  # above the packed kernels' row limits: the reference's math, bit for bit
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, gguf_reference(ref, x, config.quant_type, config.compute_dtype))
    assert model.get_memory_footprint() < 0.6 * ref.get_memory_footprint()

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved == config.to_dict()
    again = ToyModel.from_pretrained(tmp_path / "q")
    assert again.hf_quantizer.quantization_config == config
    with torch.no_grad():
        assert torch.equal(again(x), out)

    expected_w = again.blocks[0].dequantized_weight().to(torch.bfloat16)
    plain = again.dequantize()
    assert type(plain.blocks[0]) is torch.nn.Linear and plain.hf_quantizer is None
    assert plain.blocks[0].weight.dtype == torch.bfloat16  # reloaded in the dtype it was saved in
    assert torch.equal(plain.blocks[0].weight, expected_w)
    # a model loaded in bf16 dequantizes to bf16 whatever compute_dtype is, so it still runs
    expected_w = model.blocks[0].dequantized_weight().to(torch.bfloat16)
    model.dequantize()
    assert model.blocks[0].weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[0].weight, expected_w)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, atol=0.05, rtol=0.05)


def test_fallback_for_rows_not_in_blocks_and_modules_to_not_convert(tmp_path):
    save_toy(tmp_path / "m", width=48, hidden=64)   # proj_in rows of 48 do not fit blocks of 32
    config = GGUFQuantizationConfig(torch.bfloat16, quant_type="Q4_0",
                                    modules_to_not_convert=["proj_out"])
    model = ToyModel.from_pretrained(tmp_path / "m", quantization_config=config)
    assert model.proj_in.qtype.name == "BF16" and model.blocks[0].qtype.name == "Q4_0"
    assert type(model.proj_out) is torch.nn.Linear
    model.save_pretrained(tmp_path / "q")
    again = ToyModel.from_pretrained(tmp_path / "q")
    x = toy_input(width=48)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_quant_type_none_refuses_full_precision_checkpoint(tmp_path):
    save_toy(tmp_path / "m")
    with pytest.raises(QuantizationError, match=r"quant_type=None\) only loads pre-quantized GGUF "
                                                 r"weights.*pass quant_type="):
        ToyModel.from_pretrained(tmp_path / "m", quantization_config=GGUFQuantizationConfig())


def test_corrupt_saved_blocks_name_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    save_toy(tmp_path / "m")
    model = ToyModel.from_pretrained(tmp_path / "m", quantization_config=GGUFQuantizationConfig(
        quant_type="Q8_0"))
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["blocks.0.weight"] = sd["blocks.0.weight"][:, :-34].contiguous()  # one block short per row
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"GGUF layer 'blocks.0': Q8_0 blocks of shape \[256, 238\] "
                                              r"decode to \[256, 224\], but the layer is \[256, 256\]"):
        ToyModel.from_pretrained(tmp_path / "q")
    sd["blocks.0.weight_qtype"] = torch.tensor(99, dtype=torch.int32)
    save_file(sd, path)
    with pytest.raises(CheckpointError,
                       match=r"tensor 'blocks.0.weight_qtype': GGUF type 99 is not supported"):
        ToyModel.from_pretrained(tmp_path / "q")
