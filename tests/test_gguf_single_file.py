"""from_single_file of .gguf files written by gguf-py (not by diffquant), save/reload, export.

The reference is a diffusers FluxTransformer2DModel whose weights are gguf-py's numpy
dequantization of the file's blocks: dequantize-then-matmul in float32, so outputs agree to
float rounding. Files use diffusers key names or the original BFL Flux names.
"""

import copy
import struct
from pathlib import Path

import diffusers
import gguf
import numpy as np
import pytest
import torch

from diffquant import FluxTransformer2DModel
from diffquant.errors import CheckpointError, ConfigError, QuantizationError
from diffquant.quantizers.gguf import GGUFLinear, GGUFQuantizationConfig
from diffquant.ops.formats.gguf import quantize
from diffquant.single_file import export_gguf
from tests.toy import flux_inputs

Q = gguf.GGMLQuantizationType
TINY = dict(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6), guidance_embeds=True)
ATOL = 1e-5


def _type_for(key: str, value: torch.Tensor):
    """A mixed file, as real GGUF releases are: several quant types, floats for small tensors."""
    if value.dim() == 1:
        return Q.F32
    if key.endswith("timestep_embedder.linear_1.weight"):   # rows of 256: a K-quant
        return Q.Q6_K
    if key == "x_embedder.weight":
        return Q.F16
    if key == "context_embedder.weight":
        return Q.BF16
    return Q.Q4_1 if "ff" in key else Q.Q8_0


def _blocks(key, value, qtype, rng):
    if qtype == Q.Q6_K:  # gguf-py cannot quantize K types: random but valid blocks
        rows = value.shape[0]
        raw = rng.integers(0, 256, size=(rows, 210), dtype=np.uint8)
        raw[:, 208:210] = np.array([0.001], np.float16).view(np.uint8)  # small scale d
        return raw
    return gguf.quants.quantize(value.float().numpy(), qtype)


def write_flux_gguf(path, state_dict, rename=lambda sd: sd):
    """Write ``state_dict`` with gguf-py's GGUFWriter; returns the dequantized state dict."""
    rng = np.random.default_rng(0)
    dequantized, stored = {}, {}
    for key, value in state_dict.items():
        qtype = _type_for(key, value)
        data = _blocks(key, value, qtype, rng)
        stored[key] = (data, qtype)
        dequantized[key] = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), np.float32))
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, data in rename(stored).items():
        arr, qtype = data
        writer.add_tensor(key, arr, raw_dtype=qtype if arr.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


def to_bfl(stored, prefix=""):
    """Diffusers Flux names -> the original BFL names (fused qkv/linear1), written by hand."""
    sd, out = dict(stored), {}

    def cat(keys, swap=False):
        parts = [sd.pop(k) for k in keys]
        arrays = [p[0] for p in parts]
        if swap:
            a = arrays[0]
            arrays = [a[a.shape[0] // 2:], a[:a.shape[0] // 2]]
        return np.concatenate(arrays, axis=0), parts[0][1]

    for leaf in ("weight", "bias"):
        for src, dst in [("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                         ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                         ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                         ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                         ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                         ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                         ("context_embedder", "txt_in"), ("x_embedder", "img_in"),
                         ("proj_out", "final_layer.linear")]:
            out[f"{dst}.{leaf}"] = sd.pop(f"{src}.{leaf}")
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = cat([f"norm_out.linear.{leaf}"], swap=True)
        t, d = "transformer_blocks.0.", "double_blocks.0."
        out[f"{d}img_attn.qkv.{leaf}"] = cat([f"{t}attn.to_{c}.{leaf}" for c in "qkv"])
        out[f"{d}txt_attn.qkv.{leaf}"] = cat([f"{t}attn.add_{c}_proj.{leaf}" for c in "qkv"])
        for src, dst in [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                         ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj")]:
            out[f"{d}{dst}.{leaf}"] = sd.pop(f"{t}{src}.{leaf}")
        s, b = "single_transformer_blocks.0.", "single_blocks.0."
        out[f"{b}linear1.{leaf}"] = cat([f"{s}attn.to_{c}.{leaf}" for c in "qkv"] + [f"{s}proj_mlp.{leaf}"])
        out[f"{b}linear2.{leaf}"] = sd.pop(f"{s}proj_out.{leaf}")
        out[f"{b}modulation.lin.{leaf}"] = sd.pop(f"{s}norm.linear.{leaf}")
    for src, dst in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"),
                     ("norm_added_k", "txt_attn.norm.key_norm")]:
        out[f"double_blocks.0.{dst}.scale"] = sd.pop(f"transformer_blocks.0.attn.{src}.weight")
    out["single_blocks.0.norm.query_norm.scale"] = sd.pop("single_transformer_blocks.0.attn.norm_q.weight")
    out["single_blocks.0.norm.key_norm.scale"] = sd.pop("single_transformer_blocks.0.attn.norm_k.weight")
    assert not sd, sorted(sd)
    return {prefix + k: v for k, v in out.items()}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny diffusers Flux, its config dir, a mixed GGUF in diffusers names and in BFL names,
    and the reference model holding the dequantized weights."""
    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**TINY).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref.save_pretrained(root / "config")
    sd = ref.state_dict()
    dequantized = write_flux_gguf(root / "diffusers.gguf", sd)
    write_flux_gguf(root / "bfl.gguf", sd, rename=lambda s: to_bfl(s, "model.diffusion_model."))
    ref.load_state_dict(dequantized)
    with torch.no_grad():
        expected = ref(**flux_inputs()).sample
    return dict(root=root, ref=ref, expected=expected)


def _run(model):
    with torch.no_grad():
        return model(**flux_inputs()).sample


@pytest.mark.parametrize("name", ["diffusers.gguf", "bfl.gguf"])
def test_from_single_file_matches_dequantized_reference(flux, name):
    model = FluxTransformer2DModel.from_single_file(
        flux["root"] / name, quantization_config=GGUFQuantizationConfig(torch.float32),
        config=str(flux["root"] / "config"))
    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer, GGUFLinear) and layer.qtype.name == "Q8_0"
    assert model.time_text_embed.timestep_embedder.linear_1.qtype.name == "Q6_K"
    assert model.transformer_blocks[0].ff.net[2].qtype.name == "Q4_1"
    assert model.context_embedder.qtype.name == "F32"  # floats are kept at the load dtype
    assert set(model.state_dict()) >= set(flux["ref"].state_dict())
    torch.testing.assert_close(_run(model), flux["expected"], atol=ATOL, rtol=0)


def test_bfl_keys_infer_the_config(flux):
    model = FluxTransformer2DModel.from_single_file(
        flux["root"] / "bfl.gguf", quantization_config=GGUFQuantizationConfig(torch.float32),
        axes_dims_rope=(4, 6, 6))
    for key, value in TINY.items():
        assert tuple(model.config[key]) == value if key == "axes_dims_rope" else \
            model.config[key] == value, key
    torch.testing.assert_close(_run(model), flux["expected"], atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match=r"bfl.gguf: attention_head_dim=16, so the rope axes "
                                          r"cannot be inferred.*pass axes_dims_rope"):
        FluxTransformer2DModel.from_single_file(flux["root"] / "bfl.gguf")


def test_without_quantization_config_weights_are_dequantized(flux):
    model = FluxTransformer2DModel.from_single_file(flux["root"] / "diffusers.gguf",
                                                    config=flux["root"] / "config")
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert model.hf_quantizer is None
    torch.testing.assert_close(_run(model), flux["expected"], atol=ATOL, rtol=0)


def test_bf16_compute_and_modules_to_not_convert(flux):
    config = GGUFQuantizationConfig(torch.bfloat16, modules_to_not_convert=["proj_out"])
    model = FluxTransformer2DModel.from_single_file(flux["root"] / "bfl.gguf", quantization_config=config,
                                                    config=flux["root"] / "config")
    assert type(model.proj_out) is torch.nn.Linear and model.proj_out.weight.dtype == torch.bfloat16
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in flux_inputs().items()}
    reference = copy.deepcopy(flux["ref"]).to(torch.bfloat16)  # the same weights, run in bf16
    with torch.no_grad():
        got, expected = model(**inputs).sample, reference(**inputs).sample
    # the 1-2 row layers (embeddings, modulation) take the packed int4 kernels: bf16 rounding,
    # compounded over the blocks (tests/test_fast_paths.py holds each layer to the rounding bound)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 0.02


def test_save_pretrained_reloads_without_config(flux, tmp_path):
    model = FluxTransformer2DModel.from_single_file(
        flux["root"] / "bfl.gguf", quantization_config=GGUFQuantizationConfig(torch.float32),
        config=flux["root"] / "config")
    model.save_pretrained(tmp_path)
    again = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert again.transformer_blocks[0].attn.to_q.qtype.name == "Q8_0"
    assert again.config.quantization_config == model.config.quantization_config
    before, after = model.state_dict(), again.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_run(again), _run(model))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_export_gguf_reads_back_in_gguf_py_and_diffusers(flux, tmp_path, qtype):
    plain = FluxTransformer2DModel.from_pretrained(flux["root"] / "config")
    path = export_gguf(plain, tmp_path / "out.gguf", qtype, layout="diffusers")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == set(plain.state_dict())
    assert types["transformer_blocks.0.attn.to_q.weight"] == qtype
    assert types["transformer_blocks.0.attn.to_q.bias"] == "F32"
    ours = FluxTransformer2DModel.from_single_file(path, quantization_config=GGUFQuantizationConfig(),
                                                   config=flux["root"] / "config")
    theirs = diffusers.FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(flux["root"] / "config"), torch_dtype=torch.float32)
    # diffusers dequantizes in float16 (the scales' dtype), diffquant in float32 as gguf-py does;
    # for Q8_0/Q4_0 a float32 product of a half scale and a small int is exact, so diffusers'
    # weights are exactly ours rounded to float16, and outputs differ by that rounding only.
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    for name, layer in ours.named_modules():
        if isinstance(layer, GGUFLinear) and layer.qtype.name == qtype:
            theirs_w = dequantize_gguf_tensor(theirs.get_submodule(name).weight)
            assert torch.equal(theirs_w, layer.dequantized_weight().half()), name
    torch.testing.assert_close(_run(ours), _run(theirs), atol=0.02, rtol=0)
    # the file holds exactly the blocks diffquant's quantizer makes of the float weights
    w = plain.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(ours.transformer_blocks[0].attn.to_q.weight, quantize(w, qtype))


def test_export_of_a_gguf_model_keeps_its_blocks(flux, tmp_path):
    model = FluxTransformer2DModel.from_single_file(
        flux["root"] / "diffusers.gguf", quantization_config=GGUFQuantizationConfig(torch.float32),
        config=flux["root"] / "config")
    path = export_gguf(model, tmp_path / "again.gguf", "Q8_0")   # the community layout
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["time_in.in_layer.weight"] == "Q6_K"   # an embedder, but its blocks are kept
    assert not any(k.endswith("weight_qtype") for k in types)
    again = FluxTransformer2DModel.from_single_file(path, quantization_config=GGUFQuantizationConfig(),
                                                    config=flux["root"] / "config")
    assert torch.equal(_run(again), _run(model))


# -- damaged files ---------------------------------------------------------------------------
def _small_gguf(path):
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("proj.weight", gguf.quants.quantize(np.ones((4, 32), np.float32), Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return bytearray(path.read_bytes())


def _tensor_info_offset(data: bytes) -> int:
    """Byte offset of the type id of the only tensor ("proj.weight", 2 dims)."""
    at = data.index(b"proj.weight") + len(b"proj.weight")
    return at + 4 + 2 * 8


def test_damaged_files_name_file_and_tensor(tmp_path):
    from diffquant.gguf_file import GGUFFile

    good = _small_gguf(tmp_path / "good.gguf")
    cases = {
        "magic.gguf": (b"GGML" + good[4:], r"magic.gguf: not a GGUF file: expected magic b'GGUF'"),
        "header.gguf": (good[:40], r"header.gguf: truncated GGUF file: reading .* needs bytes"),
        "data.gguf": (good[:-100], r"data.gguf: tensor 'proj.weight' data \[\d+, \d+\) lies beyond "
                                  r"the end of the file"),
    }
    bad_type = bytearray(good)
    struct.pack_into("<I", bad_type, _tensor_info_offset(good), 99)
    cases["type.gguf"] = (bad_type, r"type.gguf: tensor 'proj.weight' has GGML type id 99, which "
                                    r"diffquant cannot read")
    far = bytearray(good)
    struct.pack_into("<Q", far, _tensor_info_offset(good) + 4, 1 << 20)
    cases["offset.gguf"] = (far, r"offset.gguf: tensor 'proj.weight' starts at data offset 1048576, "
                                 r"but the tensors before it end at 0")
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=message):
            GGUFFile(tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            FluxTransformer2DModel.from_single_file(tmp_path / name, config={})
    with GGUFFile(tmp_path / "good.gguf") as f:
        torch.testing.assert_close(f.read_dequantized("proj.weight"), torch.ones(4, 32), atol=1e-3, rtol=0)


def test_bfl_safetensors_quantizes_while_loading(flux, tmp_path):
    from safetensors.torch import save_file

    plain = FluxTransformer2DModel.from_pretrained(flux["root"] / "config")
    stored = {k: (v.numpy(), None) for k, v in plain.state_dict().items()}
    save_file({k: torch.from_numpy(v[0]) for k, v in to_bfl(stored).items()}, tmp_path / "bfl.safetensors")
    loaded = FluxTransformer2DModel.from_single_file(tmp_path / "bfl.safetensors",
                                                     config=flux["root"] / "config")
    assert torch.equal(_run(loaded), _run(plain))
    quantized = FluxTransformer2DModel.from_single_file(
        tmp_path / "bfl.safetensors", config=flux["root"] / "config",
        quantization_config=GGUFQuantizationConfig(quant_type="Q8_0"))
    layer = quantized.single_transformer_blocks[0].proj_mlp
    assert torch.equal(layer.weight, quantize(plain.single_transformer_blocks[0].proj_mlp.weight, "Q8_0"))
    with pytest.raises(QuantizationError, match=r"quant_type=None\) only loads pre-quantized GGUF weights"):
        FluxTransformer2DModel.from_single_file(tmp_path / "bfl.safetensors", config=flux["root"] / "config",
                                                quantization_config=GGUFQuantizationConfig())


def test_torch_dtype_by_name_and_auto_in_a_single_file(flux):
    model = FluxTransformer2DModel.from_single_file(flux["root"] / "diffusers.gguf",
                                                    config=flux["root"] / "config",
                                                    torch_dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="FluxTransformer2DModel.from_single_file: "
                                          "torch_dtype='auto' has no single dtype to follow"):
        FluxTransformer2DModel.from_single_file(flux["root"] / "diffusers.gguf",
                                                config=flux["root"] / "config", torch_dtype="auto")


SINGLE_FILE_CHILD = r"""
import sys, torch
from diffquant import FluxTransformer2DModel, GGUFQuantizationConfig
link = "https://huggingface.co/someorg/flux-gguf/blob/main/sub/diffusers.gguf"
m = FluxTransformer2DModel.from_single_file(
    link, config="someorg/flux-pipe", quantization_config=GGUFQuantizationConfig(torch.float32))
print("loaded", m.transformer_blocks[0].attn.to_q.qtype.name, m.config.num_layers)
try:
    FluxTransformer2DModel.from_single_file(
        "https://huggingface.co/someorg/flux-gguf/blob/main/absent.gguf", config="someorg/flux-pipe")
except Exception as err:
    print("error", type(err).__name__, err)
"""


def test_hub_file_link_and_pipeline_config_id_load_from_the_cache(flux, tmp_path):
    """diffusers' GGUF example: from_single_file("https://huggingface.co/ORG/REPO/blob/main/F",
    config=<pipeline hub id>): the file through huggingface_hub's cache, the config from the
    pipeline repository's transformer/ folder (HF_HUB_OFFLINE: nothing leaves the machine)."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub"
    for repo, files in (("flux-gguf", {"sub/diffusers.gguf": flux["root"] / "diffusers.gguf"}),
                        ("flux-pipe", {"transformer/config.json": flux["root"] / "config" / "config.json",
                                       "model_index.json": None})):
        snap = hub / f"models--someorg--{repo}" / "snapshots" / commit
        for rel, src in files.items():
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, snap / rel) if src else (snap / rel).write_text("{}")
        (hub / f"models--someorg--{repo}" / "refs").mkdir()
        (hub / f"models--someorg--{repo}" / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SINGLE_FILE_CHILD], cwd=Path(__file__).parents[1],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"loaded Q8_0 {TINY['num_layers']}" in out.stdout
    assert ("error CheckpointError https://huggingface.co/someorg/flux-gguf/blob/main/absent.gguf: "
            "'absent.gguf' is not in someorg/flux-gguf at main") in out.stdout


def test_a_missing_single_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.gguf: single-file checkpoint not found \(a "
                                              r"local .gguf or .safetensors file, or a https://"):
        FluxTransformer2DModel.from_single_file(tmp_path / "nope.gguf")
