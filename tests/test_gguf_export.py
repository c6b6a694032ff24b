"""export_gguf's community layout, metadata and recipes, checked by what other programs check.

- the GGUF specification and ggml's reader rules, on the raw bytes (tests/gguf_spec.py);
- ComfyUI-GGUF's loader (city96/ComfyUI-GGUF loader.py + dequant.py): gguf-py's GGUFReader,
  general.architecture in its image list, the logical shape as reversed(tensor.shape), blocks
  that decode to exactly that many values, and the original (BFL) Flux key names its Flux model
  has, written here by hand (tests/test_gguf_single_file.to_bfl), not by diffquant's tables;
- the fused tensors are the ones the community's own tools make: for the legacy types, gguf-py's
  reference quantizer (what city96's convert + llama-quantize write) of the fused float tensor;
- round trips diffusers layout <-> community layout <-> diffusers with identical tensors.
"""

import diffusers
import gguf
import numpy as np
import pytest
import torch

from diffquant import FluxTransformer2DModel
from diffquant.errors import ConfigError, QuantizationError
from diffquant.gguf_export import export_gguf, relayout_gguf
from diffquant.gguf_recipes import plan_types, resolve_recipe, use_more_bits
from diffquant.ops.formats.gguf import quantize
from diffquant.quantizers.gguf import GGUFQuantizationConfig
from tests.gguf_spec import check_gguf_file
from tests.test_gguf_kquant import wide_flux  # noqa: F401  (a fixture, shared)
from tests.test_gguf_single_file import to_bfl
from tests.toy import flux_inputs

IMG_ARCH_LIST = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
                 "lumina2", "qwen_image"}   # ComfyUI-GGUF loader.py
EMBEDDERS = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


@pytest.fixture(scope="module")
def wide(wide_flux):
    """test_gguf_kquant's Flux with rows of 256 almost everywhere (the K-quants apply)."""
    model = FluxTransformer2DModel.from_pretrained(wide_flux)
    bfl = {k: v[0] for k, v in to_bfl({k: (v.numpy(), None) for k, v in model.state_dict().items()}).items()}
    return dict(config=wide_flux, model=model, bfl=bfl)


@pytest.fixture(scope="module")
def exported(wide, tmp_path_factory):
    """Each export made once for the module (K-quant searches take seconds on two cores)."""
    root, done = tmp_path_factory.mktemp("exports"), {}

    def get(name, **kwargs):
        if name not in done:
            done[name] = export_gguf(wide["model"], root / f"{name}.gguf", **kwargs)
        return done[name]
    return get


def comfyui_read(path) -> dict:
    """ComfyUI-GGUF's gguf_sd_loader (+ dequantize_tensor) over gguf-py: {key: float32 array}."""
    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.architecture")
    assert len(field.types) == 1 and field.types[0] == gguf.GGUFValueType.STRING
    assert str(field.parts[field.data[-1]], encoding="utf-8") in IMG_ARCH_LIST
    out = {}
    for tensor in reader.tensors:
        assert reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}") is None
        shape = tuple(int(v) for v in reversed(tensor.shape))
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = np.array(tensor.data).reshape(shape)      # torch_tensor.view(*shape)
        else:   # dequantize(): the raw rows as blocks, decoded, reshaped to the logical shape
            block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
            rows = np.array(tensor.data).reshape(-1, np.array(tensor.data).shape[-1])
            assert rows.size % size == 0 and rows.size // size * block == int(np.prod(shape))
            values = gguf.quants.dequantize(rows, tensor.tensor_type).reshape(shape)
        out[tensor.name] = (values.astype(np.float32), tensor.tensor_type.name)
    return out


@pytest.mark.parametrize("kind", [dict(qtype="Q8_0"), dict(qtype="Q4_0"), dict(recipe="Q4_K_M")])
def test_community_file_as_the_ecosystem_reads_it(wide, exported, kind):
    path = exported(next(iter(kind.values())), progress=True, **kind)
    info = check_gguf_file(path)
    meta = {k: v for k, (_, v) in info["metadata"].items()}
    recipe = resolve_recipe(kind.get("qtype"), kind.get("recipe"))
    assert meta["general.architecture"] == "flux" and meta["general.quantization_version"] == 2
    assert meta["general.file_type"] == {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}[recipe.name]
    assert meta["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{recipe.name}"])
    read = comfyui_read(path)
    assert set(read) == set(wide["bfl"])   # the original names, every one, nothing else
    for key, (values, kind_name) in read.items():
        expected = wide["bfl"][key]
        assert values.shape == expected.shape, key
        if values.ndim == 1:
            assert kind_name == "F32"
        elif key.startswith(EMBEDDERS):
            assert kind_name == "BF16", key
        elif recipe.name == "Q4_K_M":
            assert kind_name == ("Q5_K" if key.endswith("attn.qkv.weight") else "Q4_K"), key
        else:
            assert kind_name == recipe.name, key
        if kind_name in ("Q8_0", "Q4_0"):  # what the community's own quantizer makes of it
            reference = gguf.quants.dequantize(gguf.quants.quantize(expected, gguf.GGMLQuantizationType[kind_name]),
                                               gguf.GGMLQuantizationType[kind_name])
        elif kind_name in ("F32", "BF16") or key == "double_blocks.0.img_attn.qkv.weight":
            blocks = quantize(torch.from_numpy(expected), kind_name)   # the fused float, quantized
            reference = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind_name])
        else:   # K-quants (no reference quantizer in gguf-py): the values, within their error
            error = np.linalg.norm(values - expected) / np.linalg.norm(expected)
            assert error < {"Q4_K": 0.075, "Q5_K": 0.037}[kind_name], (key, error)
            continue
        np.testing.assert_array_equal(values, reference.reshape(values.shape), err_msg=key)


def test_round_trips_between_layouts_keep_every_tensor(wide, exported, tmp_path):
    community = exported("Q4_K_M", recipe="Q4_K_M")
    split = relayout_gguf(community, tmp_path / "d.gguf", "diffusers")  # bytes moved, not requantized
    assert {t.name for t in gguf.GGUFReader(split).tensors} == set(wide["model"].state_dict())
    check_gguf_file(split)
    assert relayout_gguf(split, tmp_path / "c.gguf", "community").read_bytes() == community.read_bytes()

    def load(path):
        return FluxTransformer2DModel.from_single_file(path, config=wide["config"],
                                                       quantization_config=GGUFQuantizationConfig())
    a, b = load(split), load(community)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.transformer_blocks[0].attn.to_k.qtype.name == "Q5_K"   # a part of the fused qkv
    # a loaded GGUF model writes the same files again, its blocks copied, fused or split
    assert export_gguf(a, tmp_path / "c2.gguf", recipe="Q4_K_M").read_bytes() == community.read_bytes()
    again = export_gguf(b, tmp_path / "d2.gguf", recipe="Q4_K_M", layout="diffusers")
    assert again.read_bytes() == split.read_bytes()
    # from floats, the diffusers layout quantizes each part as the fused tensor's rows
    direct = export_gguf(wide["model"], tmp_path / "d3.gguf", "Q8_0", layout="diffusers")
    fused = exported("Q8_0", qtype="Q8_0")
    assert relayout_gguf(fused, tmp_path / "d4.gguf", "diffusers").read_bytes() == direct.read_bytes()


def test_diffusers_reads_the_diffusers_layout_alike(wide, exported, tmp_path):
    """diffusers' GGUF loader splits original-layout files with Flux-dev's sizes written in
    (inner 3072, MLP 12288), so at this size it reads the diffusers layout; the community file
    holds the same tensors (the round trip above)."""
    path = relayout_gguf(exported("Q4_K_M", recipe="Q4_K_M"), tmp_path / "d.gguf", "diffusers")
    ours = FluxTransformer2DModel.from_single_file(path, quantization_config=GGUFQuantizationConfig(),
                                                   config=wide["config"])
    theirs = diffusers.FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(wide["config"]), torch_dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(**flux_inputs(64, 256)).sample, theirs(**flux_inputs(64, 256)).sample
        plain = wide["model"](**flux_inputs(64, 256)).sample
    torch.testing.assert_close(a, b, atol=0.01, rtol=0)   # diffusers decodes in float16
    assert ((a - plain).norm() / plain.norm()).item() < 0.1   # measured 0.073: 4-5 bits


def test_overrides_by_glob_on_either_name(wide, tmp_path):
    path = export_gguf(wide["model"], tmp_path / "o.gguf", "Q8_0",
                       overrides={"single_blocks.*.linear2.weight": "Q6_K", "*.to_v.weight": "Q4_0",
                                  "img_in.weight": "F32"})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["single_blocks.0.linear2.weight"] == "Q6_K"
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_0"    # to_v is one of its parts
    assert types["double_blocks.0.txt_attn.qkv.weight"] == "Q8_0"    # add_v_proj is not to_v
    assert types["img_in.weight"] == "F32" and types["double_blocks.0.img_mlp.0.weight"] == "Q8_0"
    with pytest.raises(QuantizationError, match=r"GGUF override 'nothing\.\*' matches no tensor"):
        export_gguf(wide["model"], tmp_path / "x.gguf", overrides={"nothing.*": "Q8_0"})
    with pytest.raises(QuantizationError, match=r"tensor 'img_in.weight' of shape \[256, 64\] cannot "
                                                 r"be Q4_K: its rows are not a multiple of 256"):
        export_gguf(wide["model"], tmp_path / "x.gguf", overrides=["img_in.weight=Q4_K"])
    with pytest.raises(QuantizationError, match=r"override 'a.weight': type 'Q9'; expected one of"):
        export_gguf(wide["model"], tmp_path / "x.gguf", overrides={"a.weight": "Q9"})
    with pytest.raises(QuantizationError, match=r"pass either a type \('Q8_0'\) or a recipe"):
        export_gguf(wide["model"], tmp_path / "x.gguf", "Q8_0", recipe="Q4_K_M")
    with pytest.raises(QuantizationError, match=r"unknown recipe 'Q3_K_XL'; expected one of"):
        export_gguf(wide["model"], tmp_path / "x.gguf", recipe="Q3_K_XL")
    assert not (tmp_path / "x.gguf").exists()


def test_community_layout_needs_a_flux_model(tmp_path):
    from tests.toy import ToyModel

    with pytest.raises(ConfigError, match="the community layout is defined for Flux transformers; "
                                          "ToyModel is written with layout='diffusers'"):
        export_gguf(ToyModel(), tmp_path / "t.gguf", layout="community")
    path = export_gguf(ToyModel(), tmp_path / "t.gguf")      # other models: their own names
    assert {t.name for t in gguf.GGUFReader(path).tensors} == set(ToyModel().state_dict())


# -- recipes over the real models' shapes (no tensors: the rules alone) ------------------------------
def _flux_dev_entries():
    h, mlp = 3072, 12288
    entries = [("img_in.weight", (), (h, 64)), ("txt_in.weight", (), (h, 4096)),
               ("time_in.in_layer.weight", (), (h, 256)), ("vector_in.in_layer.weight", (), (h, 768)),
               ("guidance_in.in_layer.weight", (), (h, 256)), ("final_layer.linear.weight", (), (64, h)),
               ("final_layer.adaLN_modulation.1.weight", (), (2 * h, h))]
    for i in range(19):
        for s in ("img", "txt"):
            entries += [(f"double_blocks.{i}.{s}_attn.qkv.weight", (), (3 * h, h)),
                        (f"double_blocks.{i}.{s}_attn.qkv.bias", (), (3 * h,)),
                        (f"double_blocks.{i}.{s}_attn.norm.query_norm.scale", (), (128,)),
                        (f"double_blocks.{i}.{s}_mlp.2.weight", (), (h, mlp)),
                        (f"double_blocks.{i}.{s}_mod.lin.weight", (), (6 * h, h))]
    for i in range(38):
        entries += [(f"single_blocks.{i}.linear1.weight", (), (3 * h + mlp, h)),
                    (f"single_blocks.{i}.linear2.weight", (), (h, h + mlp))]
    return entries


def _counts(plan):
    out = {}
    for t in plan.values():
        out[t.name] = out.get(t.name, 0) + 1
    return out


def test_flux_recipes_follow_city96s_rules():
    entries = _flux_dev_entries()
    q4km = plan_types(entries, resolve_recipe(recipe="Q4_K_M"), "flux")
    assert _counts(q4km) == {"BF16": 7, "Q5_K": 38, "Q4_K": 38 * 2 + 38 * 2, "F32": 76}
    q5km = plan_types(entries, resolve_recipe(recipe="Q5_K_M"), "flux")
    assert q5km["double_blocks.3.img_attn.qkv.weight"].name == "Q6_K"
    assert q5km["single_blocks.3.linear1.weight"].name == "Q5_K"
    for name in ("Q4_K_S", "Q4_K"):  # no attn_v / ffn_down names in Flux: pure Q4_K
        assert {t.name for k, t in plan_types(entries, resolve_recipe(recipe=name), "flux").items()
                if k.startswith(("double_", "single_")) and k.endswith("weight")} == {"Q4_K"}
    bf16 = plan_types(entries, resolve_recipe("BF16"), "flux")
    assert _counts(bf16) == {"BF16": len(entries) - 76, "F32": 76}
    small = plan_types([("img_in.weight", (), (32, 32)), ("x.weight", (), (64, 16))],
                       resolve_recipe("Q8_0"), "flux")
    assert {k: t.name for k, t in small.items()} == {"img_in.weight": "F32", "x.weight": "F32"}


def test_t5_recipes_follow_llama_cpps_rules():
    entries = [("token_embd.weight", (), (32128, 4096))]
    for i in range(24):
        entries += [(f"enc.blk.{i}.attn_v.weight", (), (4096, 4096)),
                    (f"enc.blk.{i}.attn_q.weight", (), (4096, 4096)),
                    (f"enc.blk.{i}.ffn_down.weight", (), (4096, 10240))]
    entries.append(("enc.blk.0.attn_rel_b.weight", (), (32, 64)))
    more = [i for i in range(24) if use_more_bits(i, 24)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]   # llama.cpp's use_more_bits
    q4km = plan_types(entries, resolve_recipe(recipe="Q4_K_M"), "t5")
    assert [i for i in range(24) if q4km[f"enc.blk.{i}.attn_v.weight"].name == "Q6_K"] == more
    assert [i for i in range(24) if q4km[f"enc.blk.{i}.ffn_down.weight"].name == "Q6_K"] == more
    assert q4km["token_embd.weight"].name == "Q6_K" and q4km["enc.blk.0.attn_q.weight"].name == "Q4_K"
    assert q4km["enc.blk.0.attn_rel_b.weight"].name == "BF16"   # never quantized (llama.cpp)
    q4ks = plan_types(entries, resolve_recipe(recipe="Q4_K_S"), "t5")
    assert [i for i in range(24) if q4ks[f"enc.blk.{i}.attn_v.weight"].name == "Q5_K"] == [0, 1, 2, 3]
    assert [i for i in range(24) if q4ks[f"enc.blk.{i}.ffn_down.weight"].name == "Q5_K"] == [0, 1, 2]
    assert plan_types(entries, resolve_recipe("Q8_0"), "t5")["token_embd.weight"].name == "Q8_0"
