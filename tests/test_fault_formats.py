"""Hostile files and configs, refused by name: shapes that do not fit the model (checked before
any data is read, for every backend), safetensors and GGUF files that their reference readers
refuse, and quantization config fields of the wrong type.
"""

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffquant as dq
from diffquant.checkpoint import Checkpoint, SafetensorsFile
from diffquant.errors import CheckpointError, ConfigError
from diffquant.gguf_file import GGUFFile, write_gguf
from diffquant.ops.formats.gguf import GGMLType, quantize
from diffquant.quantizers import DiffusersAutoQuantizer
from tests.toy import ToyModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
BACKENDS = {"torchao": lambda: dq.TorchAoConfig("int8wo"),
            "bnb4": lambda: dq.BitsAndBytesConfig(load_in_4bit=True),
            "bnb8": lambda: dq.BitsAndBytesConfig(load_in_8bit=True),
            "quanto": lambda: dq.QuantoConfig("int8"),
            "gguf": lambda: dq.GGUFQuantizationConfig(torch.float32, quant_type="Q8_0"),
            "modelopt": lambda: dq.NVIDIAModelOptConfig("FP8")}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    ToyModel(width=32, hidden=32, depth=1).save_pretrained(path)
    return path


# -- shapes against the model, before reading ------------------------------------------------
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_quantize_on_load_checks_every_shape_before_reading(backend, toy_dir, tmp_path, monkeypatch):
    tensors = load_file(toy_dir / WEIGHTS)
    tensors["blocks.0.weight"] = torch.zeros(32, 48)  # the layer is [32, 32]
    save_file(tensors, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_bytes((toy_dir / "config.json").read_bytes())
    read = []
    real = SafetensorsFile.tensor
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda self, key, *a: read.append(key) or
                        real(self, key, *a))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / WEIGHTS}: tensor 'blocks.0.weight' has shape [32, 48] but ToyModel's "
            "layer 'blocks.0' is [32, 32] (out_features, in_features)")):
        ToyModel.from_pretrained(tmp_path, quantization_config=BACKENDS[backend]())
    assert read == []  # refused before a byte of data was read


# (backend, stored piece, its wrong shape, what the error says)
PIECES = [("bnb4", "blocks.0.weight.absmax", (24,), "weight.absmax holds 24 values, but a [32, 32] "
                                                   "weight in blocks of 64 needs 16"),
          ("bnb8", "blocks.0.SCB", (40,), "'SCB' should be float32 [32], got torch.float32 [40]"),
          ("quanto", "blocks.0.weight._scale", (40, 1), "'weight._scale' should be [32, 1]"),
          ("modelopt", "blocks.0.weight", (40, 32), "'weight' should be [32, 32], got "
                                                    "torch.float8_e4m3fn [40, 32]")]


@pytest.mark.parametrize("backend, key, shape, message", PIECES, ids=[p[0] for p in PIECES])
def test_stored_pieces_of_the_wrong_shape_are_refused(backend, key, shape, message, toy_dir, tmp_path):
    ToyModel.from_pretrained(toy_dir, quantization_config=BACKENDS[backend]()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ToyModel.from_pretrained(tmp_path)


def test_a_garbled_quant_state_blob_is_named(toy_dir, tmp_path):
    ToyModel.from_pretrained(toy_dir, quantization_config=BACKENDS["bnb4"]()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = "blocks.0.weight.quant_state.bitsandbytes__fp4"
    tensors[key] = torch.frombuffer(bytearray(b"not json"), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / WEIGHTS))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / WEIGHTS}: tensor '{key}': "
                                                        "BnB4BitLinear: the quant_state blob")):
        ToyModel.from_pretrained(tmp_path)


# -- safetensors: at least as strict as the safetensors library ------------------------------------
def _raw(path, header_text: str, data: bytes):
    blob = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


U8 = '{"dtype": "U8", "shape": [%d], "data_offsets": [%d, %d]}'
STRICT = {  # name: (header, data, what diffquant says)
    "duplicate name": ('{"a": %s, "a": %s}' % (U8 % (4, 0, 4), U8 % (4, 4, 8)), bytes(8),
                       "the name 'a' appears twice"),
    "bytes after the last tensor": ('{"a": %s}' % (U8 % (4, 0, 4)), bytes(8),
                                    "4 bytes follow the last tensor's data"),
    "gap between tensors": ('{"a": %s, "b": %s}' % (U8 % (2, 0, 2), U8 % (4, 4, 8)), bytes(8),
                            "tensor 'b' (bytes 4-8) leaves bytes 2-4 unused after 'a'"),
    "overlap": ('{"a": %s, "b": %s}' % (U8 % (4, 0, 4), U8 % (8, 0, 8)), bytes(8), "overlaps"),
    "metadata not strings": ('{"__metadata__": {"x": 1}, "a": %s}' % (U8 % (8, 0, 8)), bytes(8),
                             "__metadata__ is not an object of strings"),
    "NaN offset": ('{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, NaN]}}', bytes(8),
                   "NaN is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(STRICT))
def test_safetensors_the_reference_reader_refuses_are_refused(tmp_path, case):
    from safetensors import safe_open

    header, data, message = STRICT[case]
    path = tmp_path / "x.safetensors"
    _raw(path, header, data)
    with pytest.raises(Exception):  # the reference refuses it: so must diffquant
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        Checkpoint.open(path)


@pytest.mark.parametrize("entry, message", [
    ('{"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}', "invalid shape [True]"),
    ('{"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}', "unknown dtype ['U8']"),
    ('{"dtype": "U8", "shape": [1], "data_offsets": [0, 18446744073709551617]}',
     "invalid data_offsets")])
def test_safetensors_entries_of_the_wrong_type_are_named(tmp_path, entry, message):
    path = tmp_path / "x.safetensors"
    _raw(path, '{"a": %s}' % entry, bytes(1))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: entry 'a' has {message}")):
        Checkpoint.open(path)


# -- GGUF: as strict as ggml -------------------------------------------------------------------------
def _gguf(tmp_path):
    path = tmp_path / "good.gguf"
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    write_gguf(path, {"a.weight": (quantize(w, GGMLType.Q8_0), GGMLType.Q8_0),
                      "b.weight": (quantize(w, GGMLType.Q8_0), GGMLType.Q8_0)})
    return path, bytearray(path.read_bytes())


def _tensor_offset_field(raw: bytes, name: str) -> int:
    """Byte position of tensor ``name``'s u64 data offset in the tensor infos."""
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    return at + 4 + 8 * n_dims + 4


def test_gguf_tensors_that_overlap_or_leave_gaps_are_refused(tmp_path):
    path, raw = _gguf(tmp_path)
    with GGUFFile(path) as f:
        assert f.tensors["b.weight"].offset - f.tensors["a.weight"].offset == 160  # 136 -> 160
    overlap = bytearray(raw)
    struct.pack_into("<Q", overlap, _tensor_offset_field(raw, "b.weight"), 0)
    gap = bytearray(raw)
    struct.pack_into("<Q", gap, _tensor_offset_field(raw, "b.weight"), 192)
    for name, data, where in (("overlap", overlap, 0), ("gap", gap, 192)):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=re.escape(
                f"{bad}: tensor 'b.weight' starts at data offset {where}, but the tensors before "
                "it end at 160; ggml requires")):
            GGUFFile(bad)


def _gguf_kv(entries: list[bytes], n: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n) + b"".join(entries)


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize("entries, message", [
    ([_s("k") + struct.pack("<IB", 0, 1), _s("k") + struct.pack("<IB", 0, 2)], "metadata key #1 'k' is a duplicate"),
    ([_s("") + struct.pack("<IB", 0, 1)], "metadata key #0 '' is empty"),
    ([_s("general.alignment") + struct.pack("<IQ", 10, 32)], "general.alignment=32; expected a "
                                                             "power of two stored as uint32"),
], ids=["duplicate key", "empty key", "alignment u64"])
def test_gguf_metadata_ggml_refuses_is_refused(tmp_path, entries, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf_kv(entries, len(entries)))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {message}")):
        GGUFFile(path)


# -- quantization config fields --------------------------------------------------------------------
FIELDS = [  # (config dict, the message's start)
    ({"quant_method": "torchao", "quant_type": 5}, "TorchAoConfig.quant_type=5: expected a name"),
    ({"quant_method": "torchao", "quant_type": "int4wo", "quant_type_kwargs": {"group_size": 64.0}},
     "TorchAoConfig.quant_type_kwargs['group_size']=64.0: expected an int"),
    ({"quant_method": "torchao", "quant_type": "int8wo", "quant_type_kwargs": [1]},
     "TorchAoConfig.quant_type_kwargs=[1]: expected an object"),
    ({"quant_method": "torchao", "quant_type": {"default": 5}}, "TorchAoConfig.quant_type['default']"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_threshold": float("nan")},
     "BitsAndBytesConfig.llm_int8_threshold=nan: expected a finite number"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": ["nf4"]},
     "BitsAndBytesConfig.bnb_4bit_quant_type=['nf4']"),
    ({"quant_method": "quanto", "weights_dtype": ["int8"]}, "QuantoConfig.weights_dtype=['int8']"),
    ({"quant_method": "gguf", "quant_type": 8.5}, "GGUFQuantizationConfig.quant_type=8.5"),
    ({"quant_method": "gguf", "quant_type": True}, "GGUFQuantizationConfig.quant_type=True"),
    ({"quant_method": "modelopt", "quant_type": "FP8", "weight_only": "false"},
     "NVIDIAModelOptConfig.weight_only='false': expected True or False"),
    ({"quant_method": "modelopt", "quant_type": "FP8", "disable_conv_quantization": 1},
     "NVIDIAModelOptConfig.disable_conv_quantization=1: expected True or False"),
    ({"quant_method": "modelopt", "quant_type": "NVFP4", "channel_quantize": -1, "block_quantize": 0},
     "NVIDIAModelOptConfig.block_quantize=0: expected an int > 0"),
    ({"quant_method": "modelopt", "quant_type": "FP8", "calib_cfg": 5}, "NVIDIAModelOptConfig.calib_cfg=5"),
    ({"quant_method": "modelopt", "quant_type": "FP8", "modelopt_config": {"quant_cfg": 5}},
     "NVIDIAModelOptConfig.modelopt_config: expected a dict with a 'quant_cfg' object"),
]


@pytest.mark.parametrize("config, message", FIELDS, ids=[str(i) for i in range(len(FIELDS))])
def test_quantization_config_fields_of_the_wrong_type_are_named(config, message, toy_dir, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DiffusersAutoQuantizer.from_config(config)
    on_disk = json.loads((toy_dir / "config.json").read_text())  # the same in a config.json
    (tmp_path / "config.json").write_text(json.dumps({**on_disk, "quantization_config": config}))
    (tmp_path / WEIGHTS).symlink_to(toy_dir / WEIGHTS)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: "
                                                    f"quantization_config: {message}")):
        ToyModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"quant_backend": ["torchao"], "quant_kwargs": {}}, "quant_backend=['torchao']: expected a backend name"),
    ({"quant_backend": "torchao", "quant_kwargs": "int8wo"}, "quant_kwargs='int8wo': expected a dict"),
    ({"quant_backend": "torchao", "quant_kwargs": {"quant_type": "int8wo"}, "components_to_quantize": 7},
     "components_to_quantize=7: expected a component name or a list of them"),
    ({"quant_mapping": {5: dq.TorchAoConfig("int8wo")}}, "quant_mapping={5: TorchAoConfig(")])
def test_pipeline_quantization_config_fields_of_the_wrong_type_are_named(kwargs, message):
    from diffquant.quantizers import PipelineQuantizationConfig

    with pytest.raises(ConfigError, match=re.escape(f"PipelineQuantizationConfig.{message}")):
        PipelineQuantizationConfig(**kwargs)
