"""ConfigMixin, checkpoint reading/writing and ModelMixin loading rules (no quantization)."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from diffquant.checkpoint import Checkpoint, parse_size, plan_shards
from diffquant.errors import CheckpointError, ConfigError
from tests.toy import ToyModel, save_toy, toy_input


# -- ConfigMixin ------------------------------------------------------------------------------
def test_config_json_round_trip_has_diffusers_keys(tmp_path):
    model = ToyModel(width=32, hidden=64, depth=1)
    model.save_config(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "ToyModel"
    assert "_diffusers_version" in data
    assert {k: data[k] for k in ("width", "hidden", "depth")} == {"width": 32, "hidden": 64, "depth": 1}
    again = ToyModel.from_config(ToyModel.load_config(tmp_path))
    assert dict(again.config) == dict(model.config)


def test_unknown_config_keys_warn_and_missing_take_defaults(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"width": 16, "mystery": 1, "_class_name": "ToyModel"}))
    with caplog.at_level(logging.WARNING):
        model = ToyModel.from_config(ToyModel.load_config(tmp_path))
    assert "mystery" in caplog.text
    assert model.config.width == 16 and model.config.hidden == 256  # default


def test_config_not_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ToyModel.load_config(tmp_path)


def test_config_wrong_types_name_the_file(tmp_path):
    save_toy(tmp_path, width=16, hidden=32, depth=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden"] = "wide"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: cannot build ToyModel"):
        ToyModel.from_pretrained(tmp_path)


# -- loading ----------------------------------------------------------------------------------
def test_load_round_trip_and_dtype(tmp_path):
    model = save_toy(tmp_path, dtype=torch.float32, width=32, hidden=64)
    loaded = ToyModel.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32 and not loaded.training
    x = toy_input(32, dtype=torch.float32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    bf16 = ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_keep_in_fp32_modules(tmp_path, monkeypatch):
    save_toy(tmp_path, dtype=torch.float32, width=32, hidden=64)
    monkeypatch.setattr(ToyModel, "_keep_in_fp32_modules", ["norm"])
    model = ToyModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert model.norm.weight.dtype == torch.float32
    assert model.proj_in.weight.dtype == torch.float16


def test_missing_keys_raise_naming_them(tmp_path):
    save_toy(tmp_path, dtype=torch.float32, width=32, hidden=64)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    ckpt = Checkpoint.open(path)
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys() if k != "norm.bias"}
    ckpt.close()
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors .*norm\.bias"):
        ToyModel.from_pretrained(tmp_path)


def test_unexpected_keys_warn(tmp_path, caplog):
    model = save_toy(tmp_path, dtype=torch.float32, width=32, hidden=64)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(path))
    with caplog.at_level(logging.WARNING):
        ToyModel.from_pretrained(tmp_path)
    assert "extra.weight" in caplog.text


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model = save_toy(tmp_path, dtype=torch.float32, width=32, hidden=64)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["proj_in.bias"] = torch.zeros(65)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'proj_in\.bias' has shape \[65\] but ToyModel expects \[64\]"):
        ToyModel.from_pretrained(tmp_path)


def test_bin_loads_with_weights_only_and_refuses_pickled_code(tmp_path):
    model = ToyModel(width=16, hidden=32, depth=1)
    model.save_config(tmp_path)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    loaded = ToyModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.proj_in.weight, model.proj_in.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"proj_in.weight": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        ToyModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        ToyModel.from_pretrained(tmp_path, use_safetensors=True)


def test_variant_files(tmp_path):
    model = ToyModel(width=16, hidden=32, depth=1)
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = ToyModel.from_pretrained(tmp_path, variant="fp16")
    torch.testing.assert_close(loaded.proj_in.weight, model.proj_in.weight)


def test_device_map_forms(tmp_path):
    save_toy(tmp_path, dtype=torch.float32, width=16, hidden=32)
    for device_map in ("cpu", {"": "cpu"}, None):
        assert ToyModel.from_pretrained(tmp_path, device_map=device_map).device.type == "cpu"
    with pytest.raises(ConfigError, match="per-module maps are not supported"):
        ToyModel.from_pretrained(tmp_path, device_map={"proj_in": "cpu"})


# -- saving -----------------------------------------------------------------------------------
def test_sharded_save_writes_index_and_reloads(tmp_path):
    model = save_toy(tmp_path / "one", dtype=torch.float32, width=64, hidden=128, depth=3)
    model.save_pretrained(tmp_path / "many", max_shard_size="70KB")
    index = json.loads((tmp_path / "many" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((tmp_path / "many" / s).is_file() for s in shards)
    # a module's tensors stay in one shard
    assert index["weight_map"]["proj_in.weight"] == index["weight_map"]["proj_in.bias"]
    loaded = ToyModel.from_pretrained(tmp_path / "many")
    x = toy_input(64, dtype=torch.float32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # saving unsharded into the same path removes the stale shards
    model.save_pretrained(tmp_path / "many")
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == \
        ["config.json", "diffusion_pytorch_model.safetensors"]


def test_failed_save_keeps_earlier_checkpoint(tmp_path, monkeypatch):
    model = save_toy(tmp_path, dtype=torch.float32, width=16, hidden=32)
    other = ToyModel(width=16, hidden=32)
    import diffquant.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        other.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = ToyModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.proj_in.weight, model.proj_in.weight)
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.tmp-")]


def test_save_keeps_unrelated_files(tmp_path):
    save_toy(tmp_path, dtype=torch.float32, width=16, hidden=32)
    (tmp_path / "README.md").write_text("notes")
    ToyModel(width=16, hidden=32).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "notes"


def test_safetensors_metadata_and_no_pickle(tmp_path):
    save_toy(tmp_path, width=16, hidden=32)
    with Checkpoint.open(tmp_path / "diffusion_pytorch_model.safetensors") as ckpt:
        assert ckpt.metadata == {"format": "pt"}
    assert not list(tmp_path.glob("*.bin"))
    with pytest.raises(ValueError, match="safe_serialization=False"):
        ToyModel(width=16, hidden=32).save_pretrained(tmp_path, safe_serialization=False)


def test_parse_size_and_plan_shards():
    assert parse_size("10GB") == 10**10 and parse_size("1MiB") == 2**20 and parse_size(5) == 5
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")
    sizes = {"a": 6, "b": 6, "c": 3, "d": 20}
    assert plan_shards([["a"], ["b", "c"], ["d"]], sizes, 10) == [["a"], ["b", "c"], ["d"]]
