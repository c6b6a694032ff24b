"""Families diffquant does not implement, loaded through diffusers' classes with diffquant's
loader and quantizers (diffusers_bridge.py): SD3, Qwen-Image, Wan 2.1, LTX-Video and an
SDXL-style UNet, each a tiny random bf16 checkpoint saved by diffusers (tests/tiny_families.py).

diffusers is the oracle: torchao int8 weight-only equals diffusers' own torchao quantization of
the same checkpoint, every other backend stays within its format's error of diffusers'
unquantized model, and each quantized model saves and reloads with no config to the same bits.
"""

import json

import pytest
import torch

import diffusers
import diffquant
from diffquant import (AutoModel, BitsAndBytesConfig, GGUFQuantizationConfig, NVIDIAModelOptConfig,
                       QuantoConfig, TorchAoConfig, diffusers_class)
from diffquant.errors import ConfigError
from diffquant.quantizers.base import QuantizedLinear
from tests.tiny_families import FAMILIES, run, save


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory):
    """(family, bf16 checkpoint dir, inputs, diffusers' bf16 output, diffquant's bf16 footprint)."""
    fam = request.param
    directory = save(fam, tmp_path_factory.mktemp(fam.name))
    inputs = fam.inputs()
    reference = getattr(diffusers, fam.class_name).from_pretrained(directory, torch_dtype=torch.bfloat16)
    ours = AutoModel.from_pretrained(directory, torch_dtype=torch.bfloat16)
    expected = run(reference, inputs)
    # the architecture is diffusers' own: unquantized, the outputs are the same bits
    assert type(ours) is diffusers_class(fam.class_name)
    assert isinstance(ours, getattr(diffusers, fam.class_name))
    assert torch.equal(run(ours, inputs), expected)
    return fam, directory, inputs, expected, ours.get_memory_footprint()


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _quantized_layers(model) -> int:
    return sum(isinstance(m, QuantizedLinear) for m in model.modules())


def _save_reload_same_bits(model, directory, inputs, expected):
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["_class_name"] == type(model).__name__ and "quantization_config" in config
    again = AutoModel.from_pretrained(directory)  # no config, no dtype: all from the folder
    assert type(again) is type(model)
    assert torch.equal(run(again, inputs), expected)
    return again


def test_built_on_meta_with_diffusers_class_attributes(family):
    """Parameters on meta (no memory until each tensor streams in), buffers computed (rope
    tables are not in checkpoints); diffusers' class attributes win over ModelMixin's defaults,
    and _keep_in_fp32_modules keep float32 and stay unquantized."""
    fam, directory, _, _, _ = family
    cls, base = diffusers_class(fam.class_name), getattr(diffusers, fam.class_name)
    for name in ("_keep_in_fp32_modules", "_no_split_modules", "_skip_layerwise_casting_patterns",
                 "_supports_gradient_checkpointing"):
        assert getattr(cls, name) == getattr(base, name), name
    config = json.loads((directory / "config.json").read_text())
    skeleton = cls._build_on_meta(config, directory / "config.json")
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())
    keep = base._keep_in_fp32_modules or []
    model = AutoModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                      quantization_config=TorchAoConfig("int8wo"))
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if set(name.split(".")) & set(keep) else torch.bfloat16)
    for name, module in model.named_modules():
        if set(name.split(".")) & set(keep):
            assert not isinstance(module, QuantizedLinear), name


def test_torchao_int8_equals_diffusers_own_quantization(family, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    fam, directory, inputs, _, bf16_bytes = family
    theirs = getattr(diffusers, fam.class_name).from_pretrained(
        directory, torch_dtype=torch.bfloat16,
        quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
    ours = AutoModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                     quantization_config=TorchAoConfig("int8wo"))
    assert _quantized_layers(ours) > 0 and ours.quantization_method == "torchao"
    y = run(ours, inputs)
    # the same int8 values and scales; bf16 products may round differently on other kernels
    torch.testing.assert_close(y.float(), run(theirs, inputs).float(), rtol=2 ** -7, atol=2 ** -7)
    assert ours.get_memory_footprint() < 0.6 * bf16_bytes
    _save_reload_same_bits(ours, tmp_path / "saved", inputs, y)


BACKENDS = [
    pytest.param(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16), 0.25, id="bnb-nf4"),
    pytest.param(QuantoConfig("int8"), 0.05, id="quanto-int8"),
    pytest.param(GGUFQuantizationConfig(torch.bfloat16, quant_type="Q8_0"), 0.05, id="gguf-q8_0"),
    pytest.param(NVIDIAModelOptConfig("INT8", channel_quantize=0), 0.05, id="modelopt-int8"),
]


@pytest.mark.parametrize("config, tolerance", BACKENDS)
def test_every_backend_quantizes_saves_reloads_and_dequantizes(family, config, tolerance, tmp_path):
    """Within the format's error of diffusers' unquantized model; reload without a config gives
    the same bits; dequantize() leaves plain nn.Linear layers computing the same function."""
    _, directory, inputs, expected, bf16_bytes = family
    model = AutoModel.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                      quantization_config=config)
    assert _quantized_layers(model) > 0
    y = run(model, inputs)
    assert _rel_err(y, expected) < tolerance
    assert model.get_memory_footprint() < bf16_bytes
    again = _save_reload_same_bits(model, tmp_path / "saved", inputs, y)
    again.dequantize()
    assert _quantized_layers(again) == 0 and not again.is_quantized
    assert "quantization_config" not in again.config
    assert _rel_err(run(again, inputs), y) < 0.02


def test_class_reached_by_name_through_diffquant():
    """``diffquant.<Class>`` is the same bridged class AutoModel picks; pipelines likewise."""
    assert diffquant.WanTransformer3DModel is diffusers_class("WanTransformer3DModel")
    assert issubclass(diffquant.WanTransformer3DModel, diffusers.WanTransformer3DModel)
    assert issubclass(diffquant.WanPipeline, diffusers.WanPipeline)
    assert diffquant.FluxTransformer2DModel.__module__ == "diffquant.models.transformer_flux"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchModel'"):
        diffquant.NoSuchModel  # noqa: B018


def test_unknown_class_name_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuchTransformer2DModel"}))
    with pytest.raises(ConfigError, match=r"config.json: 'NoSuchTransformer2DModel' is neither a "
                                          r"class diffquant implements nor a diffusers .* ModelMixin"):
        AutoModel.from_pretrained(tmp_path)


def test_pre_014_attention_names_are_renamed_as_diffusers_does(tmp_path):
    """Old VAE checkpoints name their attention query/key/value/proj_attn; diffusers' loader
    renames them (_fix_state_dict_keys_on_load), and so does diffquant's, while streaming."""
    from safetensors.torch import load_file, save_file

    from tests.tiny_pipeline import VAE_CONFIG

    torch.manual_seed(0)
    diffusers.AutoencoderKL(**VAE_CONFIG).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(path).items():
        for new, name in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        tensors[key] = value
    assert any(".query." in k for k in tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    ours = diffusers_class("AutoencoderKL").from_pretrained(tmp_path)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.decode(z).sample, theirs.decode(z).sample)
