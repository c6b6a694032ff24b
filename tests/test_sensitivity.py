"""The per-layer sensitivity measure (diffquant.sensitivity, ``diffquant sensitivity``): one
forward per layer and format with that layer alone quantized by its real backend, the error of
the output against the unquantized model's. On Ray: tests/test_batch_ray.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.sensitivity import layer_sensitivity, quantize_linear, relative_error
from tests.test_cli import main_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 32)).to(torch.bfloat16)


def test_each_layer_quantized_alone_against_the_whole_output():
    model = small_model()
    x = {"input": torch.randn(8, 256).bfloat16()}
    errors = layer_sensitivity(model, x, ["gguf:q8_0", "gguf:q4_k", "torchao:int8wo"],
                               progress=False)
    # the first layer by hand: its real Q8_0 layer swapped in, the whole output compared
    reference = model(**x)
    by_hand = nn.Sequential(quantize_linear(model[0], "gguf:q8_0"), model[1], model[2])
    assert errors["0"]["gguf:q8_0"] == relative_error(by_hand(**x), reference)
    assert type(model[0]) is nn.Linear and torch.equal(model(**x), reference)  # restored
    assert 0 < errors["0"]["gguf:q8_0"] < errors["0"]["gguf:q4_k"]
    # Q4_K's blocks are 256 wide: the 64-input layer cannot hold it (GGUF would keep it in float)
    assert errors["2"]["gguf:q4_k"] is None and errors["2"]["gguf:q8_0"] > 0


def test_layer_globs_and_bad_formats():
    model = small_model()
    x = {"input": torch.randn(2, 256).bfloat16()}
    assert list(layer_sensitivity(model, x, ["gguf:q8_0"], layers=["2"], progress=False)) == ["2"]
    with pytest.raises(ConfigError, match=r"no nn.Linear layer matches \['blocks.\*'\]; the model "
                                          r"has 0, 2"):
        layer_sensitivity(model, x, ["gguf:q8_0"], layers=["blocks.*"], progress=False)
    with pytest.raises(ConfigError, match=r"format 'gguf:q8_0@vae' names components"):
        layer_sensitivity(model, x, ["gguf:q8_0@vae"], progress=False)
    with pytest.raises(ConfigError, match=r"unknown gguf scheme 'q3'"):
        layer_sensitivity(model, x, ["gguf:q3"], progress=False)


def test_the_command_on_the_shipped_pipeline(tmp_path, capsys):
    out = tmp_path / "sensitivity.json"
    code = main_in_process("sensitivity", "--format", "gguf:q8_0", "--format", "gguf:q4_k",
                           "--layers", "single_transformer_blocks.0.proj_*", "--height", 32,
                           "--width", 32, "--json", out, "-q")
    assert code == 0
    errors = json.loads(out.read_text())
    layers = ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"]
    assert list(errors) == layers
    for name in layers:  # 128 and 640 inputs: Q8_0 holds them, Q4_K's 256-wide blocks do not
        assert errors[name]["gguf:q8_0"] > 0 and errors[name]["gguf:q4_k"] is None
    table = capsys.readouterr().out
    assert "layer" in table and "gguf:q4_k" in table and f"wrote {out}" in table
