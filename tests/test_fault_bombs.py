"""Bombs: small files that describe something huge. Each is refused by name before the memory
or the time it describes is spent; the loads run in children whose address space may grow by
2 GiB at most, so a bomb that goes off fails the test instead of the machine.
"""

import json
import re
import struct

import pytest
import torch

from diffquant.checkpoint import Checkpoint
from diffquant.errors import CheckpointError, ConfigError
from diffquant.gguf_file import GGUFFile
from tests import faults
from tests.faults import Child
from tests.toy import ToyModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
HEADROOM = 2 << 30


def _safetensors(path, header: dict, data_size: int, raw_header: bytes | None = None):
    """A safetensors file of ``data_size`` data bytes, sparse: nothing is written there."""
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + data_size)


def _bomb_checkpoint(folder):
    """A toy checkpoint whose blocks.0.weight claims [65536, 32768] float32 (8 GiB) in a
    sparse file of a few KB on disk; the other tensors are real."""
    torch.manual_seed(0)
    model = ToyModel(width=16, hidden=32, depth=1)
    model.save_pretrained(folder)
    header, offset = {}, 0
    for key, t in model.state_dict().items():
        shape = [65536, 32768] if key == "blocks.0.weight" else list(t.shape)
        size = 4 * torch.Size(shape).numel()
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    _safetensors(folder / WEIGHTS, header, offset)


def load_bounded(path, config):
    """Load ``path`` quantizing with ``config``, in 2 GiB of headroom; the error it raised."""
    faults.limit_memory(HEADROOM)
    try:
        ToyModel.from_pretrained(path, quantization_config=config)
    except (CheckpointError, ConfigError) as err:
        return f"{type(err).__name__}: {err}"
    return "loaded"


def test_sparse_header_bomb_is_refused_before_any_allocation(tmp_path):
    import diffquant as q

    _bomb_checkpoint(tmp_path)
    config = q.GGUFQuantizationConfig(torch.float32, quant_type="Q8_0")
    out = Child(load_bounded, tmp_path, config).result()
    assert out.startswith(f"CheckpointError: {tmp_path / WEIGHTS}: tensor 'blocks.0.weight' has "
                          "shape [65536, 32768] but ToyModel's layer 'blocks.0' is [32, 32]"), out


def test_stored_piece_bomb_is_refused_before_any_allocation(tmp_path):
    import diffquant as q

    torch.manual_seed(0)
    ToyModel(width=16, hidden=32, depth=1).save_pretrained(tmp_path / "plain")
    ToyModel.from_pretrained(tmp_path / "plain", quantization_config=q.QuantoConfig("int8")) \
        .save_pretrained(tmp_path)
    header, data = _read(tmp_path / WEIGHTS)
    header["blocks.0.weight._scale"]["shape"] = [1 << 30, 2]     # 8 GiB of float32
    _relayout(tmp_path / WEIGHTS, header)
    out = Child(load_bounded, tmp_path, None).result()
    assert out.startswith(f"CheckpointError: {tmp_path / WEIGHTS}: tensor 'blocks.0.weight._scale' "
                          "claims [1073741824, 2] (8,589,934,592 bytes) for a layer of [32, 32]"), out


def _read(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _relayout(path, header):
    """Rewrite the offsets of ``header`` in order (sparse data of the claimed sizes)."""
    offset, out = 0, {}
    for key, info in header.items():
        if key == "__metadata__":
            out[key] = info
            continue
        item = {"F32": 4, "I8": 1, "U8": 1, "BF16": 2, "F16": 2}[info["dtype"]]
        size = item * torch.Size(info["shape"]).numel()
        out[key] = {**info, "data_offsets": [offset, offset + size]}
        offset += size
    _safetensors(path, out, offset)


# -- configs that describe huge models -------------------------------------------------------------
def build_bounded(path, cls_name):
    faults.limit_memory(HEADROOM)
    import diffquant

    try:
        getattr(diffquant, cls_name).from_pretrained(path)
    except ConfigError as err:
        return str(err)
    return "built"


@pytest.mark.parametrize("field, value, expected", [
    ("num_layers", 1_000_000, r"~\d[\d,]+ modules and ~[\d,]+ parameters \(num_layers=1,000,000\), "
                              r"which need at least [\d,.]+ GiB"),
    ("attention_head_dim", 1 << 20, r"has [\d,]+ parameters, which need at least [\d,.]+ GiB but "
                                    r"[\d,.]+ GiB of memory is available")])
def test_config_of_a_huge_model_is_refused_before_it_is_built(tmp_path, field, value, expected):
    from diffquant import FluxTransformer2DModel
    from tests.tiny_pipeline import TRANSFORMER_CONFIG

    FluxTransformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    if field == "attention_head_dim":
        config["axes_dims_rope"] = [value // 2, value // 4, value // 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = Child(build_bounded, tmp_path, "FluxTransformer2DModel").result()
    assert out.startswith(f"{tmp_path / 'config.json'}: FluxTransformer2DModel from this config")
    assert re.search(expected, out), out


# -- parsers: depth, digits, counts ----------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = "9" * 5000


@pytest.mark.parametrize("text", [f'{{"depth": {DEEP}}}', f'{{"depth": {DIGITS}}}'], ids=["deep", "digits"])
def test_config_json_bombs_name_the_file(tmp_path, text):
    ToyModel(width=16, hidden=32, depth=1).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: (JSON nested too deep|not "
                                          r"valid JSON \(an integer of 5000 digits)"):
        ToyModel.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(text)
    from diffquant import DiffusionPipeline

    with pytest.raises(ConfigError, match=rf"{tmp_path / 'model_index.json'}: "):
        DiffusionPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", [f'{{"a": {{"dtype": "F32", "shape": {DEEP}}}}}',
                                  f'{{"a": {{"dtype": "F32", "shape": [{DIGITS}], "data_offsets": [0, 4]}}}}'],
                         ids=["deep", "digits"])
def test_safetensors_header_bombs_name_the_file(tmp_path, text):
    path = tmp_path / "x.safetensors"
    _safetensors(path, {}, 4, raw_header=text.encode())
    with pytest.raises(CheckpointError, match=rf"{path}: header is not valid JSON|{path}: header: JSON"):
        Checkpoint.open(path)


def _gguf_bytes(kv: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("kv, message", [
    (_key("a") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1)) * 20_000 + struct.pack("<IQ", 0, 0),
     "is an array of GGUF type 9; ggml reads arrays of numbers, booleans or strings only"),
    (_key("a") + struct.pack("<IIQ", 9, 0, 1 << 40), "claims an array of 1,099,511,627,776 values"),
    (_key("a") + struct.pack("<IIQ", 9, 0, 1 << 25) + b"\0" * (1 << 25),
     "claims an array of 33,554,432 values"),
    (_key("a") + struct.pack("<IQ", 8, 1 << 62), "truncated GGUF file: reading metadata 'a'"),
], ids=["nested arrays", "huge count", "count past the budget", "huge string"])
def test_gguf_metadata_bombs_name_the_file(tmp_path, kv, message):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(_gguf_bytes(kv, 1))
    with pytest.raises(CheckpointError, match=f"{path}: .*{message}"):
        GGUFFile(path)


@pytest.mark.parametrize("field, value", [("num_train_timesteps", 10**12), ("shift", float("nan"))])
def test_scheduler_config_bombs_name_the_file(tmp_path, field, value):
    from diffquant.schedulers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: FlowMatchEulerDiscreteScheduler: "
                                                    f"{field}={value!r}; expected")):
        FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
