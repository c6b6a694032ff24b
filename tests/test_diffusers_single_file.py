"""GGUF single files of the families loaded through diffusers: keys converted by diffusers' own
converters (diffusers_single_file.py), blocks kept as GGUF blocks.

Each test writes a tiny model's weights under the original code's key names (fused qkv and
BFL-style (shift, scale) modulation for SD3, Wan's original names, Qwen-Image's diffusers
names), Q8_0 where a row fits the block, and loads the file with diffquant and with diffusers'
``from_single_file``: the outputs agree within bf16 rounding.
"""

import gguf
import pytest
import torch

import diffusers
from diffquant import AutoModel, GGUFQuantizationConfig, diffusers_class
from diffquant.errors import ConfigError
from diffquant.ops.formats.gguf import FLOAT_TYPES, GGMLType, quantize
from diffquant.quantizers.gguf import GGUFLinear
from tests.tiny_families import FAMILIES, build, run

BY_NAME = {f.name: f for f in FAMILIES}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _swap_halves(t):
    return torch.cat(t.chunk(2, dim=0)[::-1])


def _sd3_original(sd: dict, layers: int) -> dict:
    """diffusers' SD3 keys -> the original MMDiT's (the inverse of diffusers' converter)."""
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for a, b in [("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
                 ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                 ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                 ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                 ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
                 ("proj_out", "final_layer.linear")]:
        for leaf in ("weight", "bias"):
            out[f"{b}.{leaf}"] = sd.pop(f"{a}.{leaf}")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(sd.pop(f"norm_out.linear.{leaf}"))
        for i in range(layers):
            t, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            last = i == layers - 1
            out[f"{j}x_block.attn.qkv.{leaf}"] = torch.cat(
                [sd.pop(f"{t}attn.to_{x}.{leaf}") for x in "qkv"])
            out[f"{j}context_block.attn.qkv.{leaf}"] = torch.cat(
                [sd.pop(f"{t}attn.add_{x}_proj.{leaf}") for x in "qkv"])
            context_mod = sd.pop(f"{t}norm1_context.linear.{leaf}")
            out[f"{j}context_block.adaLN_modulation.1.{leaf}"] = \
                _swap_halves(context_mod) if last else context_mod
            pairs = [("attn.to_out.0", "x_block.attn.proj"), ("norm1.linear", "x_block.adaLN_modulation.1"),
                     ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")]
            if not last:
                pairs += [("attn.to_add_out", "context_block.attn.proj"),
                          ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                          ("ff_context.net.2", "context_block.mlp.fc2")]
            for a, b in pairs:
                out[f"{j}{b}.{leaf}"] = sd.pop(f"{t}{a}.{leaf}")
    assert not sd, sorted(sd)
    return out


_WAN = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"), ("attn1", "self_attn"),
        ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
        (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
        ("norm2", "norm3"), ("proj_out", "head.head")]


def _wan_original(sd: dict, layers: int) -> dict:
    """diffusers' Wan keys -> the original Wan code's (the inverse of diffusers' renames)."""
    out = {}
    for key, value in sd.items():
        for a, b in _WAN:
            key = key.replace(a, b)
        key = "head.modulation" if key == "scale_shift_table" else \
            key.replace("scale_shift_table", "modulation")
        out[key] = value
    return out


# Qwen-Image's shared GGUFs carry diffusers' names, without ComfyUI's "model.diffusion_model."
CASES = {"sd3": _sd3_original, "wan21": _wan_original, "qwenimage": lambda sd, layers: sd}
PREFIX = {"sd3": "model.diffusion_model.", "wan21": "model.diffusion_model.", "qwenimage": ""}


def _write(family, original, path):
    """The family's random model as a GGUF file in its original layout (Q8_0 where rows fit)."""
    model = build(family).to(torch.bfloat16)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    tensors = {}
    for key, value in original(sd, family.config["num_layers"]).items():
        qtype = GGMLType.Q8_0 if value.dim() == 2 and value.shape[1] % 32 == 0 else GGMLType.F32
        tensors[PREFIX[family.name] + key] = (quantize(value, qtype), qtype)
    # as the converters behind shared files write them, with gguf-py: ComfyUI's long prefixed
    # names and Wan's 5-D patch embedding, which diffquant's own writer (ggml's limits) refuses
    writer = gguf.GGUFWriter(str(path), family.name)
    for name, (blocks, qtype) in tensors.items():
        writer.add_tensor(name, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_gguf_single_file_equals_diffusers_from_single_file(name, tmp_path):
    family = BY_NAME[name]
    config_dir = tmp_path / "config"
    model = _write(family, CASES[name], tmp_path / "model.gguf")
    model.save_config(config_dir)
    inputs = family.inputs()
    gguf = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    cls = diffusers_class(family.class_name)
    ours = cls.from_single_file(tmp_path / "model.gguf", config=str(config_dir),
                                quantization_config=gguf, torch_dtype=torch.bfloat16)
    theirs = getattr(diffusers, family.class_name).from_single_file(
        str(tmp_path / "model.gguf"), config=str(config_dir), torch_dtype=torch.bfloat16,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    q8 = [n for n, m in ours.named_modules() if isinstance(m, GGUFLinear) and m.qtype == GGMLType.Q8_0]
    assert q8  # the file's blocks, kept (split along rows where the original fused q, k, v)
    # the same tensors as diffusers' conversion gives: every block byte, every other value
    theirs_sd = theirs.state_dict()
    for name, module in ours.named_modules():
        if isinstance(module, GGUFLinear):
            weight = theirs_sd.pop(f"{name}.weight")
            if module.qtype in FLOAT_TYPES:  # a row that fits no block: float in the file
                assert torch.equal(module.dequantized_weight().to(weight.dtype), weight), name
            else:
                assert int(weight.quant_type) == module.qtype, name
                assert torch.equal(module.weight, weight.as_tensor()), name
    ours_sd = ours.state_dict()
    for key, value in theirs_sd.items():  # decoded ones (Wan's float32 time embedder) too
        torch.testing.assert_close(ours_sd[key], value.to(ours_sd[key].dtype), rtol=2 ** -8,
                                   atol=0, msg=key)
    # diffusers decodes Q8_0 in float16, then bf16; diffquant in float32: a weight may round one
    # bf16 step apart, which these random networks amplify to ~1% of the output
    y, reference = run(ours, inputs), run(theirs, inputs)
    assert ((y.float() - reference.float()).norm() / reference.float().norm()).item() < 0.02
    ours.save_pretrained(tmp_path / "saved")  # a GGUF model saves and reloads without a config
    assert torch.equal(run(AutoModel.from_pretrained(tmp_path / "saved"), inputs), y)


def test_unquantized_single_file_and_missing_config(tmp_path):
    """Without a quantization config the blocks are decoded into plain layers; a file of another
    family fails in diffusers' converter with the file named."""
    family = BY_NAME["wan21"]
    model = _write(family, _wan_original, tmp_path / "wan.gguf")
    model.save_config(tmp_path / "config")
    cls = diffusers_class(family.class_name)
    plain = cls.from_single_file(tmp_path / "wan.gguf", config=str(tmp_path / "config"),
                                 torch_dtype=torch.bfloat16)
    assert not any(isinstance(m, GGUFLinear) for m in plain.modules())
    inputs = family.inputs()
    ref = run(model, inputs).float()
    assert ((run(plain, inputs).float() - ref).norm() / ref.norm()).item() < 0.05
    with pytest.raises(ConfigError, match="no converter from an original single-file checkpoint"):
        diffusers_class("AutoencoderKLQwenImage").from_single_file(tmp_path / "wan.gguf")
