"""A corpus of bad inputs: each raises a diffquant error naming the file and key/field.

Pipeline-, GGUF- and backend-specific bad inputs live beside their features; this file covers
the checkpoint layer, configs and the quantization-config layer.
"""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffquant.errors import CheckpointError, ConfigError, DiffquantError
from diffquant.quantizers import DiffusersAutoQuantizer
from tests.toy import ToyModel

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def good(tmp_path):
    """A valid float32 toy checkpoint directory."""
    torch.manual_seed(0)
    ToyModel(width=16, hidden=32, depth=1).save_pretrained(tmp_path)
    return tmp_path


def _raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _header_of(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _corrupt(good, mutate):
    path = good / WEIGHTS
    header, data = _header_of(path)
    header, data = mutate(header, data)
    _raw_safetensors(path, header, data)
    return path


CASES = {
    "truncated file": lambda h, d: (h, d[: len(d) // 2]),
    "offsets past the end": lambda h, d: ({**h, "proj_in.bias": {**h["proj_in.bias"],
                                          "data_offsets": [0, len(d) + 64]}}, d),
    "size not matching shape": lambda h, d: ({**h, "proj_in.bias": {**h["proj_in.bias"],
                                             "shape": [31]}}, d),
    "unknown dtype": lambda h, d: ({**h, "proj_in.bias": {**h["proj_in.bias"], "dtype": "Q9"}}, d),
    "negative shape": lambda h, d: ({**h, "proj_in.bias": {**h["proj_in.bias"], "shape": [-32]}}, d),
    "missing offsets": lambda h, d: ({**h, "proj_in.bias": {"dtype": "F32", "shape": [32]}}, d),
    "overlapping tensors": lambda h, d: ({**h, "norm.bias": {**h["norm.bias"],
                                          "data_offsets": h["norm.weight"]["data_offsets"]}}, d),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_safetensors(good, case):
    path = _corrupt(good, CASES[case])
    with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
        ToyModel.from_pretrained(good)


def test_header_length_lies(good):
    path = good / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(CheckpointError, match=r"header length 1000000000 does not fit"):
        ToyModel.from_pretrained(good)


def test_header_not_json(good):
    path = good / WEIGHTS
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        ToyModel.from_pretrained(good)


def test_empty_file(good):
    (good / WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError, match="only 0 bytes"):
        ToyModel.from_pretrained(good)


def test_wrong_dtype_tensor_is_cast_but_wrong_shape_is_named(good):
    sd = ToyModel(width=16, hidden=32, depth=1).state_dict()
    sd = {k: v.to(torch.int32) if k == "norm.weight" else v.contiguous() for k, v in sd.items()}
    sd["blocks.0.weight"] = torch.zeros(32, 31)
    save_file(sd, str(good / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.weight' has shape \[32, 31\]"):
        ToyModel.from_pretrained(good)


def _shard(good, weight_map):
    (good / WEIGHTS).unlink()
    (good / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_names_missing_shard(good):
    _shard(good, {"proj_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"shard 'diffusion_pytorch_model-00001-of-00002\.safetensors'"
                                              r" \(holding 'proj_in\.weight'\) is missing"):
        ToyModel.from_pretrained(good)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors"])
def test_index_path_outside_directory(good, name):
    _shard(good, {"proj_in.weight": name})
    with pytest.raises(CheckpointError, match="outside"):
        ToyModel.from_pretrained(good)


def test_index_without_weight_map(good):
    (good / WEIGHTS).unlink()
    (good / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="'weight_map' should be a non-empty object"):
        ToyModel.from_pretrained(good)


def test_index_not_json(good):
    (good / WEIGHTS).unlink()
    (good / f"{WEIGHTS}.index.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"index\.json: not valid JSON"):
        ToyModel.from_pretrained(good)


def test_index_lies_about_shard_contents(good):
    (good / WEIGHTS).rename(good / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (good / f"{WEIGHTS}.index.json").write_text(json.dumps(
        {"weight_map": {"nothing.here": "diffusion_pytorch_model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"'nothing\.here' is in .* which lacks it"):
        ToyModel.from_pretrained(good)


def test_missing_directory_and_weights(tmp_path, good):
    with pytest.raises(CheckpointError, match="no such directory"):
        ToyModel.from_pretrained(tmp_path / "nope")
    (good / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        ToyModel.from_pretrained(good)


def test_config_is_a_list(good):
    (good / "config.json").write_text("[1]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, got list"):
        ToyModel.from_pretrained(good)


def test_truncated_bin_file(good):
    (good / WEIGHTS).unlink()
    (good / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin: not a readable"):
        ToyModel.from_pretrained(good)


# -- quantization configs ---------------------------------------------------------------------
def test_quantization_config_not_an_object(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["quantization_config"] = "int8"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: key 'quantization_config' should be an object"):
        ToyModel.from_pretrained(good)


def test_quantization_config_unknown_method(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "magic"}
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"Unknown quantization method 'magic'; supported methods are"):
        ToyModel.from_pretrained(good)


def test_quantization_config_without_method():
    with pytest.raises(ConfigError, match="no 'quant_method' key"):
        DiffusersAutoQuantizer.from_config({"bits": 4})


def test_all_errors_are_diffquant_errors():
    assert issubclass(CheckpointError, (DiffquantError, OSError))
    assert issubclass(ConfigError, (DiffquantError, ValueError))


# -- torch_dtype given as a name ------------------------------------------------------------------
@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                         ("float32", torch.float32)])
def test_torch_dtype_by_name_is_that_dtype(good, name, dtype):
    """diffusers turns a string torch_dtype into float32 with a warning; a name loads its dtype,
    the same weights as the dtype object, quantized or not."""
    from diffquant import TorchAoConfig

    by_name = ToyModel.from_pretrained(good, torch_dtype=name)
    by_dtype = ToyModel.from_pretrained(good, torch_dtype=dtype)
    assert by_name.dtype == dtype
    for key, value in by_dtype.state_dict().items():
        assert torch.equal(by_name.state_dict()[key], value), key
    quantized = ToyModel.from_pretrained(good, torch_dtype=name, quantization_config=TorchAoConfig("int8wo"))
    assert quantized.proj_in.bias.dtype == dtype


def test_torch_dtype_auto_is_the_checkpoints_own(tmp_path):
    torch.manual_seed(0)
    ToyModel(width=16, hidden=32, depth=1).to(torch.float16).save_pretrained(tmp_path)
    assert ToyModel.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float16
    assert ToyModel.from_pretrained(tmp_path).dtype == torch.float32   # None: diffusers' default


@pytest.mark.parametrize("value", ["bf16", "int8", torch.int8, 3, ""])
def test_bad_torch_dtype_is_named(good, value):
    with pytest.raises(ConfigError) as info:
        ToyModel.from_pretrained(good, torch_dtype=value)
    assert str(info.value) == (
        f"ToyModel.from_pretrained: torch_dtype={value!r}: expected a floating torch.dtype "
        "(torch.bfloat16), its name ('bfloat16', 'torch.float16'), 'auto' (the checkpoint's own "
        "dtype) or None")
