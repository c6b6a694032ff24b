"""Pipeline-level quantization end to end on a tiny diffusers-saved Flux pipeline.

PipelineQuantizationConfig's two modes give each component its own library's config: diffquant's
for the transformer (and vae), transformers' own for the text encoders. Checked here: what each
component becomes, images against the unquantized pipeline, save/reload with no config, the
errors where a library cannot do what was asked, and parity with diffusers 0.42.1 applying the
same quantization.

What transformers 5.23 can do on a CPU (found out, and pinned by these tests):
- its TorchAoConfig no longer takes a string quant type ("int8wo" raises ValueError), but with a
  torchao config object (Int8WeightOnlyConfig()) it quantizes a T5 on a CPU, and saves/reloads it;
  diffquant's global mode translates the name into that object (TorchAoConfig.transformers_kwargs);
- its QuantoConfig(weights="int8") quantizes and runs on a CPU, but cannot be saved;
- diffusers 0.42.1 refuses global mode for torchao and quanto (its config signatures differ from
  transformers'), so the diffusers side of the parity test uses quant_mapping.
"""

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from torchao.quantization import Int8WeightOnlyConfig

import diffusers
from diffquant import BitsAndBytesConfig, ConfigError, DiffusionPipeline, QuantizationError, TorchAoConfig
from diffquant.quantizers import PipelineQuantizationConfig
from tests.tiny_pipeline import TINY_PROMPT, build_tiny_flux_pipeline_dir

CALL = dict(num_inference_steps=2, max_sequence_length=16, height=32, width=32, output_type="np")
# Measured: int8 per-row weights (bf16 transformer + T5) move a [0, 1] pixel by at most 0.0033
# here; nf4 (fp16 transformer) + int8 text encoders by 0.060.
INT8_ATOL, NF4_ATOL = 0.02, 0.1
BOTH = ["transformer", "text_encoder_2"]


def run(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(TINY_PROMPT, generator=torch.Generator().manual_seed(seed), **CALL).images


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def assert_torchao_int8_by_transformers(model):
    """Every nn.Linear of a transformers model holds a torchao int8 tensor (per-row scales)."""
    assert model.is_quantized and model.hf_quantizer.quantization_config.quant_method == "torchao"
    weights = [m.weight for m in linears(model)]
    assert len(weights) == 14  # T5: 2 blocks x (q, k, v, o, wi_0, wi_1, wo)
    assert all(type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8 for w in weights)


def stored_bytes(model) -> int:
    """Bytes a model holds; a torchao tensor subclass counts its inner tensors (int8 + scales),
    which transformers' get_memory_footprint() does not (it counts numel x float32)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
        total += sum(getattr(t, n).nbytes for n in inner) if inner else t.nbytes
    return total


def assert_untouched(component, plain):
    assert not getattr(component, "is_quantized", False)
    assert getattr(component, "hf_quantizer", None) is None
    for (name, a), (_, b) in zip(component.state_dict().items(), plain.state_dict().items()):
        assert type(a) is torch.Tensor and torch.equal(a, b), name


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_flux_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def plain(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def ref_image(plain):
    return run(plain)


@pytest.fixture(scope="module")
def global_pq():
    # the DESIGN example: a scheme name, translated to a torchao object for the text encoder
    return PipelineQuantizationConfig(quant_backend="torchao",
                                      quant_kwargs={"quant_type": "int8wo"},
                                      components_to_quantize=BOTH)


@pytest.fixture(scope="module")
def global_pipe(pipe_dir, global_pq):
    return DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=global_pq)


@pytest.fixture(scope="module")
def global_image(global_pipe):
    return run(global_pipe)


# -- 1. global mode -----------------------------------------------------------------------------
def test_global_mode_quantizes_each_component_with_its_librarys_config(global_pipe, global_pq, plain,
                                                                       ref_image, global_image):
    pipe = global_pipe
    assert pipe.transformer.is_quantized
    ours = pipe.transformer.config.quantization_config
    assert type(ours) is TorchAoConfig and ours.scheme() == ("int8wo", {})
    assert pipe.transformer.dtype == torch.bfloat16  # torchao's default dtype, as in diffusers
    te2_config = pipe.text_encoder_2.hf_quantizer.quantization_config
    assert type(te2_config) is transformers.TorchAoConfig
    assert type(te2_config.quant_type) is Int8WeightOnlyConfig
    assert_torchao_int8_by_transformers(pipe.text_encoder_2)
    quantized, full = stored_bytes(pipe.text_encoder_2), stored_bytes(plain.text_encoder_2)
    assert quantized < 0.6 * full  # 14 linears int8 (+ fp32 row scales); embeddings, norms fp32
    assert pipe.transformer.get_memory_footprint() < plain.transformer.get_memory_footprint()
    assert_untouched(pipe.vae, plain.vae)
    assert_untouched(pipe.text_encoder, plain.text_encoder)

    assert set(global_pq.config_mapping) == set(BOTH)
    assert type(global_pq.config_mapping["transformer"]) is TorchAoConfig
    assert global_pq.config_mapping["text_encoder_2"] is te2_config
    text = repr(global_pq)
    assert text.startswith("PipelineQuantizationConfig(\n  text_encoder_2: ")
    assert "\n  transformer: " in text and "TorchAoConfig" in text and "Int8WeightOnlyConfig" in text

    diff = np.abs(global_image - ref_image).max()
    assert 0 < diff < INT8_ATOL, diff


def test_global_mode_string_quant_type_is_translated_for_the_text_encoder(monkeypatch):
    # transformers 5.23's TorchAoConfig takes only torchao config objects ("int8wo" raises there);
    # diffquant turns the scheme name into the object, so the DESIGN example works as written.
    pq = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize=BOTH)
    assert pq._resolve_quant_config(module_name="transformer") == TorchAoConfig("int8wo")
    theirs = pq._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2")
    assert type(theirs) is transformers.TorchAoConfig
    assert type(theirs.quant_type) is Int8WeightOnlyConfig
    int4 = PipelineQuantizationConfig(quant_backend="torchao",
                                      quant_kwargs={"quant_type": "int4wo", "group_size": 64})
    # transformers' torchao int4 packs with the mslk package: without it, a clear error up front
    # (it used to fail inside transformers' weight conversion) ...
    with pytest.raises(ConfigError, match="component 'text_encoder_2': torchao int4wo on a "
                                          "transformers model .* needs the mslk package"):
        int4._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2")
    # ... and with it, the torchao object with the caller's group size
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mslk" else find_spec(name, *a))
    assert int4._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2").quant_type.group_size == 64


def test_global_mode_translates_kwargs_one_library_names_differently():
    # diffquant's QuantoConfig says weights_dtype=, transformers' says weights= (and would
    # silently swallow weights_dtype= in its **kwargs): the name is translated
    pq = PipelineQuantizationConfig(quant_backend="quanto", quant_kwargs={"weights_dtype": "int8"},
                                    components_to_quantize=BOTH)
    assert pq._resolve_quant_config(module_name="transformer").weights_dtype == "int8"
    theirs = pq._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2")
    assert type(theirs) is transformers.QuantoConfig and theirs.weights == "int8"
    with pytest.raises(ConfigError, match=(
            r"quant_kwargs \['weights'\] are not accepted by diffquant.quantizers.quanto.QuantoConfig "
            r"\(takes \['modules_to_not_convert', 'weights_dtype'\]\); use quant_mapping")):
        PipelineQuantizationConfig(quant_backend="quanto", quant_kwargs={"weights": "int8"})


# -- 2. granular mode ---------------------------------------------------------------------------
def granular_mapping():
    return {"transformer": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            "text_encoder": transformers.QuantoConfig(weights="int8"),  # runs on a CPU, cannot save
            "text_encoder_2": transformers.TorchAoConfig(Int8WeightOnlyConfig()),
            "unet": TorchAoConfig("int8wo")}  # FluxPipeline has none: warned about, ignored


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def granular(pipe_dir):
    """(pipeline, its PipelineQuantizationConfig, the warnings loading it logged)."""
    pq = PipelineQuantizationConfig(quant_mapping=granular_mapping())
    records, logger = _Records(), logging.getLogger("diffquant.pipeline")
    logger.addHandler(records)
    try:
        pipe = DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=pq)
    finally:
        logger.removeHandler(records)
    return pipe, pq, records.messages


def test_granular_mode_quantizes_each_component_as_mapped(granular, plain, ref_image):
    from optimum.quanto import QLinear

    from diffquant.quantizers.bitsandbytes import BnB4BitLinear

    pipe, pq, warnings = granular
    mapping = pq.quant_mapping
    t = pipe.transformer
    assert t.is_quantized and t.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert t.dtype == torch.float16  # bitsandbytes' default dtype, as in diffusers
    assert linears(t) == [] and sum(isinstance(m, BnB4BitLinear) for m in t.modules()) > 10
    assert stored_bytes(t) < 0.5 * stored_bytes(plain.transformer)

    te = pipe.text_encoder
    assert te.hf_quantizer.quantization_config is mapping["text_encoder"]
    qlinears = [m for m in te.modules() if isinstance(m, QLinear)]
    assert len(qlinears) == 12 and all(q.weight._data.dtype == torch.int8 for q in qlinears)  # 2 x 6
    assert pipe.text_encoder_2.hf_quantizer.quantization_config is mapping["text_encoder_2"]
    assert_torchao_int8_by_transformers(pipe.text_encoder_2)
    assert_untouched(pipe.vae, plain.vae)

    assert pq.config_mapping == {n: mapping[n] for n in ("transformer", "text_encoder", "text_encoder_2")}
    assert any("quantization_config names component 'unet', which FluxPipeline" in w and
               "does not have; it is ignored" in w for w in warnings), warnings
    diff = np.abs(run(pipe) - ref_image).max()
    assert 0 < diff < NF4_ATOL, diff


# -- 3. save, reload with no config -------------------------------------------------------------
def test_saved_pipeline_reloads_quantized_without_config(global_pipe, global_image, tmp_path):
    global_pipe.save_pretrained(tmp_path / "q")
    for name in BOTH:
        config = json.loads((tmp_path / "q" / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "torchao", name
    back = DiffusionPipeline.from_pretrained(tmp_path / "q")  # no quantization_config
    assert back.transformer.is_quantized  # diffquant: from transformer/config.json
    assert back.transformer.hf_quantizer.quantization_config.scheme() == ("int8wo", {})
    assert_torchao_int8_by_transformers(back.text_encoder_2)  # transformers' own detection
    assert_untouched(back.vae, global_pipe.vae)
    assert_untouched(back.text_encoder, global_pipe.text_encoder)
    # the same int8 values and scales, the same float math: bit-identical
    np.testing.assert_array_equal(run(back), global_image)


def test_unsaveable_component_refused_before_anything_is_written(granular, plain, tmp_path,
                                                                  monkeypatch):
    import diffquant.pipeline as pipeline_module

    pipe = granular[0]
    writes = []
    real_save = pipeline_module._save_component
    monkeypatch.setattr(pipeline_module, "_save_component", lambda *a: writes.append(a))
    with pytest.raises(QuantizationError, match=(
            r"component 'text_encoder' \(CLIPTextModel\) is quantized with quanto by transformers, "
            r"which cannot save it; dequantize\(\) it, quantize it with a backend that saves \(e.g. "
            r"torchao\), or reload the original checkpoint")):
        pipe.save_pretrained(tmp_path / "out")
    assert writes == [] and list(tmp_path.iterdir()) == []

    # without the quanto text encoder the rest saves and comes back as it was
    monkeypatch.setattr(pipeline_module, "_save_component", real_save)
    monkeypatch.setattr(pipe, "text_encoder", plain.text_encoder)
    image = run(pipe)
    pipe.save_pretrained(tmp_path / "out")
    back = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert back.transformer.hf_quantizer.quantization_config.bnb_4bit_quant_type == "nf4"
    assert_torchao_int8_by_transformers(back.text_encoder_2)
    assert not getattr(back.text_encoder, "is_quantized", False)
    np.testing.assert_array_equal(run(back), image)


# -- 4. parity with diffusers -------------------------------------------------------------------
def test_diffusers_refuses_global_mode_for_these_backends():
    # why the diffusers side below uses quant_mapping: 0.42.1 demands identical __init__
    # signatures of its and transformers' config classes
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ

    with pytest.raises(ValueError, match="signatures of the __init__ methods .* don't match"):
        DiffusersPQ(quant_backend="torchao", quant_kwargs={"quant_type": Int8WeightOnlyConfig()},
                    components_to_quantize=BOTH)


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_images_match_diffusers_applying_the_same_config(pipe_dir, global_image, backend):
    from diffusers.quantizers import PipelineQuantizationConfig as DiffusersPQ

    from diffquant import QuantoConfig

    if backend == "torchao":
        theirs = {"transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
                  "text_encoder_2": transformers.TorchAoConfig(Int8WeightOnlyConfig())}
        ours_image = global_image
    else:
        theirs = {"transformer": diffusers.QuantoConfig(weights_dtype="int8"),
                  "text_encoder": transformers.QuantoConfig(weights="int8")}
        ours = PipelineQuantizationConfig(quant_mapping={
            "transformer": QuantoConfig("int8"), "text_encoder": transformers.QuantoConfig(weights="int8")})
        ours_image = run(DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=ours))
    ref = diffusers.FluxPipeline.from_pretrained(pipe_dir, quantization_config=DiffusersPQ(quant_mapping=theirs))
    # the same int8 values, scales and dtypes (bf16 torchao / fp32 quanto transformer): on the
    # reference CPU the images are bit-identical; 1e-5 leaves room for other matmul kernels
    np.testing.assert_allclose(run(ref), ours_image, atol=1e-5, rtol=0)
    # diffusers' own PipelineQuantizationConfig, given to diffquant, is read as ours
    same = DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=DiffusersPQ(quant_mapping=theirs))
    np.testing.assert_array_equal(run(same), ours_image)
