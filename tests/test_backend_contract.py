"""The contract every registered backend keeps, run over each backend's ``cpu_examples()``.

A backend appears here by registering itself (``@register_quantizer``) and listing configs that
run on a CPU; each config also says its weight width through a ``bits`` hint (8, 4, ...), which
sets the forward tolerance and the memory saving it must reach on tests/toy.py's model, whose
weights are almost all nn.Linear.
"""

import copy
import json

import pytest
import torch
from torch import nn

import diffquant.quantizers  # noqa: F401  (registers every backend present)
from diffquant.quantizers import AUTO_QUANTIZATION_CONFIG_MAPPING, DiffusersAutoQuantizer
from tests.toy import ToyModel, save_toy, toy_input

LINEARS = ("proj_in", "blocks.0", "blocks.1", "proj_out")
# proj_out may stay nn.Linear: some backends skip output projections by default (modelopt's
# "*proj_out.*" pattern, as in diffusers)
QUANTIZED = ("proj_in", "blocks.0", "blocks.1")


def _examples():
    seen, out = set(), []
    for key, cls in sorted(AUTO_QUANTIZATION_CONFIG_MAPPING.items()):
        if cls in seen:  # bitsandbytes registers one config class under two keys
            continue
        seen.add(cls)
        for i, config in enumerate(cls.cpu_examples()):
            out.append(pytest.param(config, id=f"{key}-{i}-{_short(config)}"))
    return out


def _short(config) -> str:
    d = config.to_dict()
    bits = [str(v) for k, v in sorted(d.items()) if isinstance(v, (str, int)) and not isinstance(v, bool)
            and k != "quant_method"]
    return "-".join(bits)[:40] or "default"


EXAMPLES = _examples()


def _bits(config) -> int:
    bits = getattr(config, "bits", None)
    if not isinstance(bits, int):
        pytest.fail(f"{type(config).__name__} has no integer `bits` hint (the weight width, e.g. 8 "
                    "or 4); add a `bits` property so the contract tests know what to expect")
    return bits


def _tolerance(bits: int) -> float:
    """Relative L2 error of the toy's output allowed at this weight width."""
    return 0.05 if bits >= 8 else 0.25 if bits >= 4 else 0.6


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _with_skip(config, modules):
    """The same config with ``modules`` left unquantized (bitsandbytes names the field differently)."""
    d = config.to_dict()
    field = next((f for f in ("modules_to_not_convert", "llm_int8_skip_modules") if f in d), None)
    if field is None:
        pytest.fail(f"{type(config).__name__}.to_dict() has no modules_to_not_convert field")
    d[field] = list(modules)
    return DiffusersAutoQuantizer.from_dict(d)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A bf16 toy checkpoint, its model, and the unquantized output on a fixed input."""
    directory = tmp_path_factory.mktemp("toy")
    # depth 4: the linears dominate as in Flux, so a backend that keeps proj_out in bf16 by
    # default (modelopt) is still judged on a realistic mix
    model = save_toy(directory, depth=4)
    x = toy_input()
    with torch.no_grad():
        return directory, model, x, model(x)


@pytest.fixture(scope="module", params=EXAMPLES)
def quantized(request, toy, tmp_path_factory):
    """(config, model quantized on load, its save directory); do not mutate the model."""
    config = request.param
    model = ToyModel.from_pretrained(toy[0], quantization_config=config, torch_dtype=torch.bfloat16)
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    return config, model, saved


def test_some_backend_is_registered():
    assert EXAMPLES, "no backend registered cpu_examples()"


@pytest.mark.parametrize("config", EXAMPLES)
def test_config_json_round_trip(config):
    text = json.dumps(config.to_dict())
    again = DiffusersAutoQuantizer.from_dict(json.loads(text))
    assert type(again) is type(config) and again == config
    assert json.loads(again.to_json_string()) == json.loads(text)


def test_quantize_on_load_sets_state(quantized):
    config, model, _ = quantized
    for name in QUANTIZED:
        assert type(model.get_submodule(name)) is not nn.Linear, f"{name} was not quantized"
    assert model.hf_quantizer is not None and model.is_quantized
    assert model.quantization_method == config.quant_method
    assert model.hf_quantizer.quantization_config == config


def test_forward_close_to_unquantized(quantized, toy):
    config, model, _ = quantized
    _, _, x, ref = toy
    with torch.no_grad():
        y = model(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert _rel_err(y, ref) < _tolerance(_bits(config))


def test_memory_footprint_shrinks(quantized, toy):
    config, model, _ = quantized
    bits = _bits(config)
    ratio = toy[1].get_memory_footprint() / model.get_memory_footprint()
    assert ratio >= (1.5 if bits >= 8 else 2.5), f"bf16 / quantized footprint is only {ratio:.2f}"


def test_save_then_reload_is_bit_identical(quantized, toy):
    config, model, saved = quantized
    written = json.loads((saved / "config.json").read_text())
    assert "_pre_quantization_dtype" not in written
    assert DiffusersAutoQuantizer.from_dict(written["quantization_config"]) == config
    again = ToyModel.from_pretrained(saved)  # no config passed: detected from config.json
    assert again.hf_quantizer.pre_quantized and again.is_quantized
    x = toy[2]
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("rows", [1, 6])  # the one-row kernels' prepared forms, the many-row
def test_a_deep_copy_is_independent_and_gives_the_same_outputs(quantized, toy, rows):
    """diffusers' models deep-copy (EMA copies, a pipeline's components): the copy holds its
    own tensors and prepared forms, so changing either one leaves the other as it was."""
    config, model, saved = quantized
    x = toy_input(rows=rows)
    with torch.no_grad():
        y = model(x)                                   # prepared forms built before the copy
        twin = copy.deepcopy(model)
        assert twin.config == model.config and twin.config is not model.config
        assert twin.hf_quantizer.quantization_config == config and twin.is_quantized
        assert torch.equal(twin(x), y)
        for t in twin.state_dict().values():           # the copy changed: the original is not
            if t.dtype.is_floating_point:
                t.zero_()
        assert torch.equal(model(x), y)
        assert not torch.equal(twin(x), y)
    again = ToyModel.from_pretrained(saved)            # a fresh one, then the original changed
    with torch.no_grad():
        twin = copy.deepcopy(again)
        for t in again.state_dict().values():
            if t.dtype.is_floating_point:
                t.zero_()
        assert torch.equal(twin(x), y)


def test_sharded_save_keeps_each_weight_in_one_shard(quantized, toy, tmp_path):
    config, model, _ = quantized
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 1
    for name in QUANTIZED:
        shards = {f for k, f in weight_map.items() if k.startswith(name + ".")}
        assert len(shards) == 1, f"{name}'s pieces are split over {sorted(shards)}"
    again = ToyModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(toy[2]), model(toy[2]))


@pytest.mark.parametrize("config", EXAMPLES)
def test_modules_to_not_convert_keeps_original_layers(config, toy):
    directory, ref, x, _ = toy
    skipping = _with_skip(config, ["proj_in", "blocks.1"])
    model = ToyModel.from_pretrained(directory, quantization_config=skipping, torch_dtype=torch.bfloat16)
    for name in ("proj_in", "blocks.1"):
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, ref.get_submodule(name).weight)
        assert torch.equal(layer.bias, ref.get_submodule(name).bias)
    assert type(model.blocks[0]) is not nn.Linear


@pytest.mark.parametrize("config", EXAMPLES)
def test_dequantize_gives_plain_model(config, toy):
    directory, _, x, ref = toy
    model = ToyModel.from_pretrained(directory, quantization_config=config, torch_dtype=torch.bfloat16)
    model.dequantize()
    assert all(type(model.get_submodule(n)) is nn.Linear for n in LINEARS)
    assert model.hf_quantizer is None and not model.is_quantized
    assert "quantization_config" not in model.config
    with torch.no_grad():
        assert _rel_err(model(x), ref) < _tolerance(_bits(config))
    model.to(torch.float16)  # a plain model casts again


def test_casting_a_quantized_model_is_refused(quantized):
    model = quantized[1]
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float(),
                 lambda m: m.to(dtype=torch.float32)):
        with pytest.raises(ValueError, match=r"is not supported on a model quantized with"):
            cast(model)


@pytest.mark.parametrize("config", EXAMPLES)
def test_low_cpu_mem_usage_false_is_refused(config, toy):
    with pytest.raises(ValueError, match=r"low_cpu_mem_usage=False cannot be used with quantization"):
        ToyModel.from_pretrained(toy[0], quantization_config=config, low_cpu_mem_usage=False)


def test_save_refuses_a_backend_that_cannot_serialize(toy, tmp_path, monkeypatch):
    from diffquant import TorchAoConfig
    from diffquant.errors import QuantizationError
    from diffquant.quantizers.torchao import TorchAoQuantizer

    model = ToyModel.from_pretrained(toy[0], quantization_config=TorchAoConfig("int8wo"))
    monkeypatch.setattr(TorchAoQuantizer, "is_serializable", property(lambda self: False))
    torch.manual_seed(0)
    ToyModel(width=16, hidden=32).save_pretrained(tmp_path)  # an earlier checkpoint at that path
    with pytest.raises(QuantizationError, match=r"quantized with torchao \(.*int8wo.*\), which cannot be saved"):
        model.save_pretrained(tmp_path)
    assert ToyModel.from_pretrained(tmp_path).config.hidden == 32  # untouched
