"""The backend registry, config dispatch and merging, and PipelineQuantizationConfig's rules."""

import logging

import pytest
import transformers

import diffquant.quantizers  # noqa: F401  (registers every backend present)
from diffquant import TorchAoConfig
from diffquant.errors import ConfigError
from diffquant.quantizers import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                  DiffusersAutoQuantizer, PipelineQuantizationConfig,
                                  QuantizationConfigMixin, register_quantizer)
from diffquant.quantizers.torchao import TorchAoQuantizer


# -- registry and dispatch -------------------------------------------------------------------
def test_dispatch_from_object_and_dict():
    q = DiffusersAutoQuantizer.from_config(TorchAoConfig("int8wo"))
    assert type(q) is TorchAoQuantizer and q.pre_quantized  # default: the checkpoint is quantized
    q = DiffusersAutoQuantizer.from_config({"quant_method": "torchao", "quant_type": "int4wo",
                                            "quant_type_kwargs": {"group_size": 32}}, pre_quantized=False)
    assert type(q) is TorchAoQuantizer and not q.pre_quantized
    assert q.quantization_config == TorchAoConfig("int4wo", group_size=32)
    assert AUTO_QUANTIZER_MAPPING["torchao"] is TorchAoQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["torchao"] is TorchAoConfig


def test_every_registered_config_dispatches_back_to_its_quantizer():
    for key, cls in AUTO_QUANTIZATION_CONFIG_MAPPING.items():
        for config in cls.cpu_examples():
            q = DiffusersAutoQuantizer.from_config(config.to_dict(), pre_quantized=False)
            assert type(q.quantization_config) is cls and q.quantization_config == config


def test_dict_without_quant_method_is_refused():
    with pytest.raises(ConfigError, match=r"quantization_config has no 'quant_method' key; expected one "
                                          r"of \[.*'torchao'.*\]"):
        DiffusersAutoQuantizer.from_config({"quant_type": "int8wo"})
    with pytest.raises(ValueError, match="no 'quant_method' key"):  # ConfigError is a ValueError
        DiffusersAutoQuantizer.from_dict({})


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match=r"Unknown quantization method 'awq'; supported methods are "
                                          r"\[.*'torchao'.*\]"):
        DiffusersAutoQuantizer.from_config({"quant_method": "awq"})
    with pytest.raises(ConfigError, match=r"quantization_config: expected a diffquant quantization config "
                                          r"\(TorchAoConfig, BitsAndBytesConfig, \.\.\.\), got str"):
        DiffusersAutoQuantizer.from_config("int8wo")
    with pytest.raises(ConfigError, match=r"expected a dict or a config object, got list"):
        DiffusersAutoQuantizer.from_dict([])


def test_config_refuses_unknown_fields_and_wrong_method():
    with pytest.raises(ConfigError, match=r"TorchAoConfig.from_dict: quant_method='gguf', "
                                          r"expected 'torchao'"):
        TorchAoConfig.from_dict({"quant_method": "gguf", "quant_type": "int8wo"})
    with pytest.raises(ConfigError, match=r"TorchAoConfig.from_dict: missing key 'quant_type'"):
        TorchAoConfig.from_dict({"quant_method": "torchao"})


def test_registering_a_key_twice_fails():
    with pytest.raises(ValueError, match=r"quantization method 'torchao' is already registered by "
                                         r"TorchAoQuantizer"):
        register_quantizer("torchao", TorchAoConfig)(type("Other", (TorchAoQuantizer,), {}))
    assert AUTO_QUANTIZER_MAPPING["torchao"] is TorchAoQuantizer


def test_merge_warns_and_checkpoint_config_wins(caplog):
    on_disk = {"quant_method": "torchao", "quant_type": "int8wo", "quant_type_kwargs": {}}
    with caplog.at_level(logging.WARNING, logger="diffquant.quantizers.auto"):
        merged = DiffusersAutoQuantizer.merge_quantization_configs(on_disk, TorchAoConfig("int4wo"))
    assert merged == TorchAoConfig("int8wo")
    assert "already quantized; its own quantization_config is used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffquant.quantizers.auto"):
        assert DiffusersAutoQuantizer.merge_quantization_configs(on_disk) == TorchAoConfig("int8wo")
    assert caplog.text == ""


def test_config_equality_repr_and_iteration():
    a = TorchAoConfig("int4wo", group_size=64, modules_to_not_convert="proj_out")
    assert a.modules_to_not_convert == ["proj_out"]
    assert a != TorchAoConfig("int4wo", group_size=128, modules_to_not_convert="proj_out")
    assert hash(a) == hash(TorchAoConfig("int4wo", group_size=64, modules_to_not_convert=["proj_out"]))
    assert repr(a) == ("TorchAoConfig(modules_to_not_convert=['proj_out'], quant_method='torchao', "
                       "quant_type='int4wo', quant_type_kwargs={'group_size': 64})")
    assert dict(a)["quant_type"] == "int4wo"
    with pytest.raises(ConfigError, match=r"modules_to_not_convert=3: expected a list of module names"):
        TorchAoConfig("int8wo", modules_to_not_convert=3)


# -- PipelineQuantizationConfig ------------------------------------------------------------------
def test_pipeline_global_mode_and_str_components():
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize="transformer")
    assert pq.components_to_quantize == ["transformer"] and not pq.is_granular
    assert repr(pq) == ("PipelineQuantizationConfig(quant_backend='torchao', quant_kwargs={'quant_type': "
                        "'int8wo'}, components_to_quantize=['transformer'])")
    assert pq._resolve_quant_config(is_diffusers=True, module_name="transformer") == TorchAoConfig("int8wo")
    assert pq._resolve_quant_config(is_diffusers=True, module_name="vae") is None
    assert repr(pq) == f"PipelineQuantizationConfig(\n  transformer: {TorchAoConfig('int8wo')!r}\n)"
    assert pq.requested_components() == {"transformer"}


def test_pipeline_global_mode_without_components_quantizes_every_diffusers_model():
    pq = PipelineQuantizationConfig(quant_backend="torchao",
                                    quant_kwargs={"quant_type": "int4wo", "group_size": 64})
    assert pq._resolve_quant_config(module_name="vae") == TorchAoConfig("int4wo", group_size=64)
    assert pq.components_to_quantize is None


def test_pipeline_granular_mode():
    theirs = transformers.BitsAndBytesConfig(load_in_8bit=True)
    pq = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig("int8dq"),
                                                   "text_encoder_2": theirs})
    assert pq.is_granular
    assert pq._resolve_quant_config(module_name="transformer") == TorchAoConfig("int8dq")
    assert pq._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2") is theirs
    assert pq._resolve_quant_config(module_name="vae") is None
    assert pq.requested_components() == {"transformer", "text_encoder_2"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
          quant_mapping={"transformer": TorchAoConfig("int8wo")}),
     r"give either quant_backend \(global mode\) or quant_mapping \(granular mode\), not both"),
    (dict(), r"give quant_backend \(with quant_kwargs\) or a quant_mapping of component name -> config"),
    (dict(quant_kwargs={"quant_type": "int8wo"}), r"give quant_backend \(with quant_kwargs\)"),
    (dict(quant_backend="torchao"), r"quant_backend needs quant_kwargs, e.g. quant_kwargs="
                                    r"\{'quant_type': 'int8wo'\} for torchao; or use quant_mapping"),
    (dict(quant_backend="awq", quant_kwargs={"bits": 4}),
     r"quant_backend='awq' is unknown; diffquant backends: \[.*'torchao'.*\]"),
    (dict(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo", "group_size": 64}),
     r"quant_kwargs \['group_size'\] are not accepted by diffquant.quantizers.torchao.TorchAoConfig: "
     r"TorchAoConfig\('int8wo'\): unknown keyword argument\(s\) \['group_size'\]"),
    (dict(quant_mapping=["transformer"]), r"quant_mapping should be a dict of component name -> "
                                          r"quantization config object"),
    (dict(quant_mapping={"transformer": {"quant_method": "torchao"}}),
     r"quant_mapping\['transformer'\] is a dict, which is not a quantization config of diffquant or "
     r"transformers \(e.g. TorchAoConfig, BitsAndBytesConfig\)"),
])
def test_pipeline_validation_rules(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PipelineQuantizationConfig(**kwargs)


class FixedConfig(QuantizationConfigMixin):
    """A backend config with a fixed signature (no **kwargs)."""

    def __init__(self, bits: int = 8, modules_to_not_convert=None):
        self.quant_method, self.bits, self.modules_to_not_convert = "fixed", bits, modules_to_not_convert


def test_pipeline_kwargs_a_fixed_signature_does_not_take_are_named(monkeypatch):
    monkeypatch.setitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "fixed", FixedConfig)
    with pytest.raises(ConfigError, match=r"quant_kwargs \['no_such_field'\] are not accepted by "
                                          r"tests.test_quant_config.FixedConfig \(takes \['bits', "
                                          r"'modules_to_not_convert'\]\); use quant_mapping with a "
                                          r"config object per component instead"):
        PipelineQuantizationConfig(quant_backend="fixed", quant_kwargs={"no_such_field": 1})
    pq = PipelineQuantizationConfig(quant_backend="fixed", quant_kwargs={"bits": 4})
    assert pq._resolve_quant_config(module_name="transformer").bits == 4


def test_pipeline_transformers_component_without_that_backend_is_refused(monkeypatch):
    from diffquant.quantizers import pipeline_config

    monkeypatch.setattr(pipeline_config, "transformers_config_mapping", lambda: {})
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize=["text_encoder"])
    with pytest.raises(ConfigError, match=r"component 'text_encoder' is a transformers model, and "
                                          r"transformers has no 'torchao' backend"):
        pq._resolve_quant_config(is_diffusers=False, module_name="text_encoder")


def test_pipeline_build_failure_names_the_component():
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"})
    pq.quant_kwargs = {"quant_type": "nope"}  # as if changed after validation
    with pytest.raises(ConfigError, match=r"component 'transformer': TorchAoConfig\(\*\*\{'quant_type': "
                                          r"'nope'\}\) failed: TorchAoConfig: unknown quant_type 'nope'"):
        pq._resolve_quant_config(module_name="transformer")


def test_diffusers_own_config_objects_are_read_as_diffquants():
    """A user who switched the pipeline's import but kept `from diffusers import TorchAoConfig`:
    diffusers' config objects (whose to_dict() holds its QuantizationMethod enum) are read as a
    diffusers config.json's quantization_config is, equal to diffquant's own."""
    import diffusers
    import torch
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ
    from torchao.quantization import Int8WeightOnlyConfig

    from diffquant import BitsAndBytesConfig, QuantoConfig
    from diffquant.quantizers import DiffusersAutoQuantizer

    pairs = [(diffusers.TorchAoConfig(Int8WeightOnlyConfig()), TorchAoConfig(Int8WeightOnlyConfig())),
             (diffusers.QuantoConfig(weights_dtype="int4"), QuantoConfig(weights_dtype="int4")),
             (diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)),
             (diffusers.BitsAndBytesConfig(load_in_8bit=True), BitsAndBytesConfig(load_in_8bit=True))]
    for theirs, ours in pairs:
        quantizer = DiffusersAutoQuantizer.from_config(theirs)
        assert quantizer.quantization_config == ours, type(theirs).__name__
        assert DiffusersAutoQuantizer.from_dict(theirs.to_dict()) == ours
    te = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    pq = PipelineQuantizationConfig.from_diffusers(DiffusersPQ(quant_mapping={
        "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()), "text_encoder_2": te}))
    assert pq.quant_mapping == {"transformer": TorchAoConfig(Int8WeightOnlyConfig()),
                                "text_encoder_2": te}
    mixed = PipelineQuantizationConfig(quant_mapping={"transformer": diffusers.QuantoConfig("int8")})
    assert mixed._resolve_quant_config(module_name="transformer") == QuantoConfig("int8")
