"""optimum-quanto backend: config JSON parity with diffusers, bytes and outputs against quanto's
own QLinear (through diffusers' quanto quantizer, which runs on a CPU), checkpoints both ways,
inference_mode for int4, the alignment guard of quanto's int8 CPU kernel."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import diffusers

from diffquant import CheckpointError, ConfigError, QuantoConfig
from diffquant.ops.formats.quanto import unpack as unpack_bits
from diffquant.quantizers import DiffusersAutoQuantizer
from diffquant.quantizers.quanto import QuantoLinear, aligned, group_size_for
from tests.toy import DiffusersToyModel, ToyModel, assert_missing_piece_is_named, save_toy, toy_input

quanto = pytest.importorskip("optimum.quanto")

DTYPES = ["int8", "float8", "int4", "int2"]
# quanto's int4 CPU layer runs a TinyGemm kernel (different summation order): 1 bf16 ulp
EXACT = {"int8": True, "float8": True, "int4": False, "int2": True}


DiffusersToy = DiffusersToyModel


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    save_toy(d, hidden=320)  # 320 inputs: quanto groups of 64 (128 -> 96 -> 64) in int4/int2
    return d


def run(model, x):
    with torch.no_grad():
        return model(x)


def assert_same_output(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7)  # bf16 rounding


def load_both(toy_dir, wd):
    ours = ToyModel.from_pretrained(toy_dir, quantization_config=QuantoConfig(wd),
                                    torch_dtype=torch.bfloat16)
    theirs = DiffusersToy.from_pretrained(toy_dir, quantization_config=diffusers.QuantoConfig(wd),
                                          torch_dtype=torch.bfloat16)
    return ours, theirs


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("wd", DTYPES)
def test_config_json_matches_diffusers_both_ways(wd):
    theirs = diffusers.QuantoConfig(wd, modules_to_not_convert=["proj_out"]).to_dict()
    theirs["quant_method"] = str(theirs["quant_method"].value)
    ours = QuantoConfig(wd, modules_to_not_convert=["proj_out"])
    assert ours.to_dict() == theirs
    assert QuantoConfig.from_dict(json.loads(json.dumps(theirs))) == ours
    assert DiffusersAutoQuantizer.from_dict(theirs) == ours
    assert type(DiffusersAutoQuantizer.from_config(ours)).__name__ == "QuantoQuantizer"


def test_config_errors():
    with pytest.raises(ConfigError, match=r"weights_dtype='int3': expected one of "
                                          r"\['float8', 'int8', 'int4', 'int2'\]"):
        QuantoConfig("int3")
    with pytest.raises(ConfigError, match="unknown field.*'activations'"):
        QuantoConfig.from_dict({"quant_method": "quanto", "weights_dtype": "int8",
                                "activations": "int8"})


@pytest.mark.parametrize("in_features", [32, 128, 160, 192, 256, 320, 352, 416])
def test_group_size_matches_quanto(in_features):
    for qtype, wd in ((quanto.qint4, "int4"), (quanto.qint8, "int8")):
        with torch.device("meta"):
            ref = quanto.QLinear(in_features, 8, weights=qtype).weight_group_size
        assert group_size_for(wd, in_features) == ref


def test_unpack_bits_matches_quanto():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (5, 7), generator=g, dtype=torch.uint8)
    for bits in (2, 4):
        ref = torch.ops.quanto.unpack(packed, bits)
        assert torch.equal(unpack_bits(packed, bits, ref.shape[0] - 1), ref[:-1])


# -- quantize on load against quanto's own layers ------------------------------------------------
@pytest.mark.parametrize("wd", DTYPES)
def test_quantize_on_load_matches_quanto_bytes_and_output(wd, toy_dir):
    ours, theirs = load_both(toy_dir, wd)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)  # quanto's names and order
    for k, v in theirs_sd.items():
        assert v.dtype == ours_sd[k].dtype and torch.equal(ours_sd[k], v), k
    for name in ("proj_in", "blocks.0", "proj_out"):  # dequantization is bit-identical
        assert torch.equal(ours.get_submodule(name).dequantized_weight(),
                           theirs.get_submodule(name).weight.dequantize())
    x = toy_input()
    assert_same_output(run(ours, x), run(theirs, x), EXACT[wd])


@pytest.mark.parametrize("wd", DTYPES)
def test_save_reload_and_load_in_diffusers(wd, toy_dir, tmp_path):
    x = toy_input()
    ours = ToyModel.from_pretrained(toy_dir, quantization_config=QuantoConfig(wd),
                                    torch_dtype=torch.bfloat16)
    y = run(ours, x)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "quanto", "weights_dtype": wd, "modules_to_not_convert": None}
    again = ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert again.hf_quantizer.quantization_config == QuantoConfig(wd)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    assert torch.equal(run(again, x), y)
    in_diffusers = DiffusersToy.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_output(run(in_diffusers, x), y, EXACT[wd])


@pytest.mark.parametrize("wd", ["int8", "int4"])
def test_diffusers_checkpoint_loads_in_diffquant(wd, toy_dir, tmp_path):
    x = toy_input()
    theirs = DiffusersToy.from_pretrained(toy_dir, quantization_config=diffusers.QuantoConfig(wd),
                                          torch_dtype=torch.bfloat16)
    y_theirs = run(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert isinstance(ours.blocks[1], QuantoLinear)
    assert_same_output(run(ours, x), y_theirs, EXACT[wd])
    on_disk = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(on_disk[k], v) for k, v in ours.state_dict().items())


# -- CPU traps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("wd", DTYPES)
def test_forward_under_inference_mode(wd, toy_dir):
    # quanto's own int4/int2 QLinear raise "Cannot set version_counter for inference tensor" here
    m = ToyModel.from_pretrained(toy_dir, quantization_config=QuantoConfig(wd),
                                 torch_dtype=torch.bfloat16)
    x = toy_input()
    with torch.inference_mode():
        y = m(x)
    assert torch.equal(y, run(m, x))


def test_unaligned_int8_data_is_realigned():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    ref = QuantoLinear(64, 32, False, weights_dtype="int8")
    ref.load_piece("weight", w, pre_quantized=False, dtype=None, device=None)
    data = ref.weight_data
    buf = torch.empty(data.numel() + 1, dtype=torch.int8)  # storage offset 1: misaligned view
    unaligned = buf[1:].view(32, 64)
    unaligned.copy_(data)
    assert unaligned.data_ptr() % 16 != 0 and aligned(unaligned).data_ptr() % 16 == 0
    layer = QuantoLinear(64, 32, False, weights_dtype="int8")
    for name, t in (("weight._data", unaligned), ("weight._scale", ref.weight_scale)):
        layer.load_piece(name, t, pre_quantized=True, dtype=None, device=None)
    assert layer.weight_data.data_ptr() % 16 == 0 and torch.equal(layer.weight_data, data)
    x = torch.randn(3, 65, generator=g).to(torch.bfloat16)[:, 1:]  # unaligned activations too
    assert torch.equal(run(layer, x), run(ref, x.contiguous()))


# -- errors, footprint, skipped modules ----------------------------------------------------------
@pytest.mark.parametrize("wd, piece", [("int8", "blocks.0.weight._scale"),
                                       ("int4", "proj_out.weight._shift"),
                                       ("int2", "proj_in.weight._data._data")])
def test_missing_piece_is_named(wd, piece, toy_dir, tmp_path):
    assert_missing_piece_is_named(toy_dir, QuantoConfig(wd), piece, tmp_path)


def test_mismatched_config_is_refused(toy_dir, tmp_path):
    ToyModel.from_pretrained(toy_dir, quantization_config=QuantoConfig("int8"),
                             torch_dtype=torch.bfloat16).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["weights_dtype"] = "float8"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'weight._data' should be torch.float8_e4m3fn "
                                              r"\[320, \d+\] for weights_dtype='float8', got "
                                              r"torch.int8"):
        ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("wd, lo, hi", [("int8", 0.5, 0.53), ("float8", 0.5, 0.53),
                                        ("int4", 0.26, 0.32), ("int2", 0.14, 0.2)])
def test_footprint_and_dequantize(wd, lo, hi, toy_dir):
    full = ToyModel.from_pretrained(toy_dir, torch_dtype=torch.bfloat16)
    q = ToyModel.from_pretrained(toy_dir, quantization_config=QuantoConfig(wd),
                                 torch_dtype=torch.bfloat16)
    assert lo < q.get_memory_footprint() / full.get_memory_footprint() < hi
    x = toy_input()
    y = run(q, x)
    q.dequantize()
    assert type(q.proj_in) is nn.Linear and q.proj_in.weight.dtype == torch.bfloat16
    torch.testing.assert_close(run(q, x), y, rtol=2 ** -6, atol=2 ** -6)


def test_modules_to_not_convert(toy_dir):
    m = ToyModel.from_pretrained(toy_dir, torch_dtype=torch.bfloat16,
                                 quantization_config=QuantoConfig("int4", ["proj_out", "blocks.*"]))
    assert type(m.proj_out) is nn.Linear and all(type(b) is nn.Linear for b in m.blocks)
    assert isinstance(m.proj_in, QuantoLinear) and m.proj_in.group_size is None  # 128 inputs
