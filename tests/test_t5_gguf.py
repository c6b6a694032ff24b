"""T5 encoder GGUF files (llama.cpp's layout, as ComfyUI-GGUF and stable-diffusion.cpp load them).

The files here are written by gguf-py's GGUFWriter the way llama.cpp's converter writes T5
encoders (names from gguf-py's own tensor map, its ``t5encoder.*`` keys), not by diffquant. The
oracle is transformers' GGUF loader (``T5EncoderModel.from_pretrained(dir, gguf_file=...)``),
which dequantizes every tensor to full size; it is given the config diffquant infers, because
its own builds a gated-ReLU feed-forward for these files where T5 v1.1 (and llama.cpp, ComfyUI)
gate with GELU.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

from diffquant import FluxPipeline, default_pipeline_path
from diffquant.errors import CheckpointError, ConfigError, QuantizationError
from diffquant.quantizers.gguf import GGUFEmbedding, GGUFLinear
from diffquant.t5_gguf import export_t5_gguf, load_t5_encoder_gguf
from tests.gguf_spec import check_gguf_file

Q = gguf.GGMLQuantizationType
CONFIG = dict(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
IDS = torch.tensor([[5, 17, 3, 90, 1], [8, 2, 44, 1, 0]])
# ComfyUI-GGUF loader.py T5_SD_MAP (and stable-diffusion.cpp's t5_name_map): llama.cpp -> original
T5_SD_MAP = {"enc.": "encoder.", ".blk.": ".block.", "token_embd": "shared",
             "output_norm": "final_layer_norm", "attn_q": "layer.0.SelfAttention.q",
             "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
             "attn_o": "layer.0.SelfAttention.o", "attn_norm": "layer.0.layer_norm",
             "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
             "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo",
             "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_norm": "layer.1.layer_norm"}


def _type_of(name: str):
    if name.endswith(("norm.weight", "attn_rel_b.weight")):
        return Q.F32
    return {"token_embd.weight": Q.Q8_0, "enc.blk.0.ffn_down.weight": Q.Q4_0,
            "enc.blk.1.attn_v.weight": Q.F16}.get(name, Q.Q8_0)


def write_t5_gguf(path, model, with_metadata=True):
    """llama.cpp's converter, in a few lines: its names, its keys, mixed types."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, cfg.num_layers)
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    if with_metadata:
        writer.add_context_length(512)
        writer.add_embedding_length(cfg.d_model)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_block_count(cfg.num_layers)
        writer.add_head_count(cfg.num_heads)
        writer.add_key_length(cfg.d_kv)
        writer.add_value_length(cfg.d_kv)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
        writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
        writer.add_vocab_size(cfg.vocab_size)   # transformers reads it (or the tokenizer's list)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        name = names.get_name(key.rpartition(".")[0]) + ".weight"
        qtype = _type_of(name)
        data = value.float().numpy()
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**CONFIG)).eval()
    write_t5_gguf(root / "t5.gguf", model)
    return dict(root=root, path=root / "t5.gguf", model=model)


def test_loads_quantized_with_no_configuration_as_transformers_dequantizes(t5):
    ours = load_t5_encoder_gguf(t5["path"])
    for key, value in CONFIG.items():
        assert getattr(ours.config, key) == value, key
    assert ours.config.dense_act_fn == "gelu_new" and ours.config.is_gated_act
    assert isinstance(ours.shared, GGUFEmbedding) and ours.shared.qtype.name == "Q8_0"
    assert ours.encoder.embed_tokens is ours.shared
    block = ours.encoder.block
    assert isinstance(block[0].layer[1].DenseReluDense.wo, GGUFLinear)
    assert block[0].layer[1].DenseReluDense.wo.qtype.name == "Q4_0"
    assert block[1].layer[0].SelfAttention.v.qtype.name == "F16"
    assert block[0].layer[0].SelfAttention.q.weight.dtype == torch.uint8   # blocks, not floats
    theirs = T5EncoderModel.from_pretrained(t5["root"], gguf_file="t5.gguf", config=ours.config).eval()
    plain = load_t5_encoder_gguf(t5["path"])
    plain.hf_quantizer.dequantize(plain)
    state = theirs.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, state[key]), key   # every weight decodes as gguf-py decodes it
    with torch.no_grad():
        got, want = ours(IDS).last_hidden_state, theirs(IDS).last_hidden_state
        original = t5["model"](IDS).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ((got - original).norm() / original.norm()).item() < 0.08   # Q8_0, Q4_0: measured 0.050


def test_shapes_alone_give_the_config(t5, tmp_path):
    path = write_t5_gguf(tmp_path / "bare.gguf", t5["model"], with_metadata=False)
    ours = load_t5_encoder_gguf(path, torch_dtype=torch.bfloat16)
    for key, value in CONFIG.items():
        assert getattr(ours.config, key) == value, key
    assert ours.encoder.final_layer_norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert ours(IDS).last_hidden_state.dtype == torch.bfloat16


def test_export_writes_what_comfyui_and_sdcpp_map_back(t5, tmp_path):
    path = export_t5_gguf(t5["model"], tmp_path / "out.gguf", recipe="Q4_K_M")
    info = check_gguf_file(path)
    meta = {k: v for k, (_, v) in info["metadata"].items()}
    assert meta["general.architecture"] == "t5encoder" and meta["general.file_type"] == 15
    assert meta["t5encoder.block_count"] == 2 and meta["t5encoder.attention.head_count"] == 4
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    expected = set(t5["model"].state_dict()) - {"encoder.embed_tokens.weight"}
    mapped = set()
    for name in types:
        for a, b in T5_SD_MAP.items():
            name = name.replace(a, b)
        mapped.add(name)
    assert mapped == expected
    assert types["enc.blk.0.ffn_down.weight"] == "BF16"     # rows of 128: no K block fits
    assert types["enc.output_norm.weight"] == "F32"
    again = load_t5_encoder_gguf(path)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).last_hidden_state, t5["model"](IDS).last_hidden_state,
                                   atol=0.02, rtol=0)
    loaded = load_t5_encoder_gguf(t5["path"])       # a GGUF model keeps its blocks when written
    copy = load_t5_encoder_gguf(export_t5_gguf(loaded, tmp_path / "copy.gguf", "Q8_0"))
    assert torch.equal(copy.shared.weight, loaded.shared.weight)
    assert copy.encoder.block[1].layer[0].SelfAttention.v.qtype.name == "Q8_0"  # its F16: the recipe
    with pytest.raises(ConfigError, match="export_t5_gguf: expected a T5 encoder"):
        export_t5_gguf(torch.nn.Linear(2, 2), tmp_path / "x.gguf")


def test_the_shipped_pipeline_runs_with_a_gguf_text_encoder_2(tmp_path):
    plain = FluxPipeline.from_pretrained(default_pipeline_path())
    path = export_t5_gguf(plain.text_encoder_2, tmp_path / "t5.gguf", "Q8_0")
    meta = {k: v for k, (_, v) in check_gguf_file(path)["metadata"].items()}
    assert meta["diffquant.t5.relative_attention_max_distance"] == 32   # not llama.cpp's 128
    t5 = load_t5_encoder_gguf(path)
    assert t5.config.relative_attention_max_distance == 32
    pipe = FluxPipeline.from_pretrained(default_pipeline_path(), text_encoder_2=t5)
    assert pipe.text_encoder_2 is t5
    kwargs = dict(prompt="a red circle above a blue square", max_sequence_length=16)
    with torch.no_grad():
        got = pipe.encode_prompt(**kwargs)[0]
        want = plain.encode_prompt(**kwargs)[0]
    assert ((got - want).norm() / want.norm()).item() < 0.02
    image = pipe(kwargs["prompt"], height=64, width=64, num_inference_steps=1, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    with pytest.raises(QuantizationError, match=r"component 'text_encoder_2' \(T5EncoderModel\) is "
                                                 r"quantized with gguf by transformers, which cannot save"):
        pipe.save_pretrained(tmp_path / "pipe")


def test_bad_files_are_named(t5, tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "flux.gguf"), "flux")
    writer.add_tensor("img_in.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"flux.gguf: general.architecture is 'flux'; a T5 encoder"):
        load_t5_encoder_gguf(tmp_path / "flux.gguf")
    model = T5EncoderModel(T5Config(**{**CONFIG, "num_heads": 2, "d_kv": 32})).eval()
    path = write_t5_gguf(tmp_path / "bad.gguf", model)
    data = bytearray(path.read_bytes())
    key = b"t5encoder.attention.head_count"
    at = data.index(key) + len(key) + 4                     # after the value type: the u32 value
    data[at:at + 4] = (8).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad.gguf: metadata says num_heads=8 but the tensors "
                                              r"say 2"):
        load_t5_encoder_gguf(path)
