"""Each LoRA file format -> diffquant's internal form, against diffusers' own converters
(diffusers.loaders.lora_conversion_utils) where they work at a tiny model's size, and against
hand-computed splits where diffusers writes Flux.1's sizes in (single blocks' linear1, BFL
names with PEFT factors)."""

from __future__ import annotations

import pytest
import torch

from diffquant.lora import convert, to_diffusers
from tests import lora_files as lf


def _diffusers_kohya(sd):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, convert_state_dict

    out = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    # its CLIP keys are diffusers' old names (to_q_lora.down), which its loader maps to PEFT's
    out = convert_state_dict(out, DIFFUSERS_OLD_TO_PEFT)
    # its converter writes the final layer and embedders without "transformer." (and its loader
    # then drops them); diffquant loads them into the transformer
    return {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v
            for k, v in out.items()}


def _mine(sd, widths=None):
    weights, ignored = convert(sd, "lora.safetensors", widths=widths)
    assert not ignored
    state, alphas = to_diffusers(weights)
    assert not alphas  # kohya's alpha is folded into the factors, as diffusers folds it
    return state


def _assert_same(mine: dict, theirs: dict):
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("comfy", [False, True], ids=["sd-scripts", "comfyui"])
@pytest.mark.parametrize("alpha", [2.0, None, 16.0], ids=["alpha2", "no-alpha", "alpha16"])
def test_kohya_equals_diffusers_converter(comfy, alpha):
    """sd-scripts' and ComfyUI's names, alpha folded with diffusers' arithmetic (bf16), CLIP keys
    (lora_te1_) to the text encoder; single blocks' linear1 aside (diffusers splits it by
    Flux.1's 3072, tested below)."""
    sd = lf.kohya(seed=1, alpha=alpha, modules=lf.NO_LINEAR1, comfy=comfy, clip=not comfy)
    _assert_same(_mine(sd), _diffusers_kohya(sd))


def test_kohya_block_diagonal_qkv_is_cut_as_diffusers_cuts_it():
    """A fused qkv trained as three rank-2 LoRAs (lora_up block-diagonal): each part gets its
    own rank slice of both factors ("sparse" in diffusers' converter)."""
    g = torch.Generator().manual_seed(3)
    down = torch.randn(6, lf.DIM, generator=g)
    up = torch.block_diag(*[torch.randn(lf.DIM, 2, generator=g) for _ in range(3)])  # [96, 6]
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0)}
    mine = _mine(sd)
    _assert_same(mine, _diffusers_kohya(sd))
    assert mine["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (2, lf.DIM)


def test_kohya_final_layer_and_embedders():
    """img_in, txt_in, time_in, guidance_in and the final layer: diffusers' names (the final
    modulation's halves swapped), alpha applied (diffusers leaves the final layer's out)."""
    modules = {k: v for k, v in lf.EMBEDDERS.items()}
    sd = lf.kohya(seed=2, alpha=None, modules=modules, clip=False)
    _assert_same(_mine(sd), _diffusers_kohya(sd))
    sd = lf.kohya(seed=2, alpha=1.0, modules={"final_layer.linear": lf.EMBEDDERS["final_layer.linear"]},
                  clip=False)
    mine = _mine(sd)
    down = sd["lora_unet_final_layer_linear.lora_down.weight"]
    up = sd["lora_unet_final_layer_linear.lora_up.weight"]
    got = mine["transformer.proj_out.lora_B.weight"].float() @ mine["transformer.proj_out.lora_A.weight"].float()
    torch.testing.assert_close(got, 0.25 * up.float() @ down.float(), rtol=1e-2, atol=1e-3)


def test_kohya_linear1_splits_by_the_models_widths():
    """linear1 = q, k, v, MLP input: split by the model's own widths (diffusers' converter
    asserts Flux.1's [3072, 3072, 3072, 12288]); lora_down shared, alpha folded."""
    shapes = {"single_blocks.0.linear1": lf.BFL_SHAPES["single_blocks.0.linear1"]}
    sd = lf.kohya(seed=4, alpha=2.0, modules=shapes, clip=False, dtype=torch.float32)
    widths = {"single_transformer_blocks.0.attn.to_q": lf.DIM, "single_transformer_blocks.0.attn.to_k": lf.DIM,
              "single_transformer_blocks.0.attn.to_v": lf.DIM,
              "single_transformer_blocks.0.proj_mlp": lf.MLP}
    down = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    for mine in (_mine(sd, widths.get), _mine(sd)):  # the model's widths; Flux's 1:1:1:4 layout
        rows = 0
        for name, width in widths.items():
            a = mine[f"transformer.{name}.lora_A.weight"]
            b = mine[f"transformer.{name}.lora_B.weight"]
            assert torch.equal(a, down * 0.5) and torch.equal(b, up[rows:rows + width])
            rows += width
    cut = {k: v[:223] if "lora_up" in k else v for k, v in sd.items()}
    with pytest.raises(OSError, match=r"lora\.safetensors: LoRA key 'lora_unet_single_blocks_0"
                                      r"_linear1\.lora_down\.weight': lora_up has 223 rows, which "
                                      r"do not split"):
        convert(cut, "lora.safetensors", widths=widths.get)


def test_xlabs_equals_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    sd = lf.xlabs(seed=5)
    _assert_same(_mine(sd), _convert_xlabs_flux_lora_to_diffusers(dict(sd)))


@pytest.mark.parametrize("prefix", ["diffusion_model.", "", "base_model.model."])
def test_bfl_names_with_peft_factors(prefix):
    """BFL's own names with lora_A/lora_B (ComfyUI, BFL, fal): q, k, v (and the MLP) share
    lora_A and split lora_B by rows; the final modulation's halves are swapped; alpha kept."""
    sd = lf.bfl_peft(seed=6, alpha=2.0, prefix=prefix)
    weights, _ = convert(sd, "bfl.safetensors")
    a = sd[f"{prefix}double_blocks.0.img_attn.qkv.lora_A.weight"]
    b = sd[f"{prefix}double_blocks.0.img_attn.qkv.lora_B.weight"]
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        w = weights[f"transformer.transformer_blocks.0.attn.{part}"]
        assert w.down is a and torch.equal(w.up, b[i * lf.DIM:(i + 1) * lf.DIM]) and w.alpha == 2.0
    b = sd[f"{prefix}single_blocks.0.linear1.lora_B.weight"]
    assert torch.equal(weights["transformer.single_transformer_blocks.0.proj_mlp"].up, b[3 * lf.DIM:])
    b = sd[f"{prefix}final_layer.adaLN_modulation.1.lora_B.weight"]
    assert torch.equal(weights["transformer.norm_out.linear"].up, torch.cat([b[lf.DIM:], b[:lf.DIM]]))
    assert torch.equal(weights["transformer.time_text_embed.timestep_embedder.linear_1"].up,
                       sd[f"{prefix}time_in.in_layer.lora_B.weight"])
    assert len(weights) == 14 + 6 + 6  # double block (qkv x 2 split), single block, embedders


def test_diffusers_format_with_alphas_and_metadata():
    """diffusers / PEFT / ai-toolkit keys as they are; alpha from '.alpha' keys (diffusers'
    network alphas) or from the lora_adapter_metadata diffusers writes."""
    a, b = torch.randn(4, 32), torch.randn(96, 4)
    sd = {"transformer.x.lora_A.weight": a, "transformer.x.lora_B.weight": b,
          "transformer.y.lora_A.weight": a, "transformer.y.lora_B.weight": b,
          "transformer.x.alpha": torch.tensor(8.0)}
    weights, _ = convert(sd, "f")
    assert weights["transformer.x"].scale == 2.0 and weights["transformer.y"].scale == 1.0
    meta = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 2, '
                                     '"transformer.alpha_pattern": {"y": 12}}'}
    weights, _ = convert({k: v for k, v in sd.items() if "alpha" not in k}, "f", meta)
    assert weights["transformer.x"].scale == 0.5 and weights["transformer.y"].scale == 3.0


@pytest.mark.parametrize("sd, match", [
    ({"transformer.x.lora_A.weight": torch.ones(2, 3)}, r"f: LoRA key 'transformer\.x\.lora_A\."
                                                        r"weight': its pair lora_B is missing"),
    ({"transformer.x.lora_B.bias": torch.ones(2)}, r"'transformer\.x\.lora_B\.bias': not a LoRA factor"),
    ({"lora_unet_double_blocks_0_img_attn_qkx.lora_down.weight": torch.ones(2, 3),
      "lora_unet_double_blocks_0_img_attn_qkx.lora_up.weight": torch.ones(3, 2)},
     r"'lora_unet_double_blocks_0_img_attn_qkx\.lora_down\.weight': 'double_blocks_0_img_attn_"
     r"qkx' is no Flux transformer layer"),
    ({"double_blocks.0.processor.qkv_lora9.down.weight": torch.ones(2, 3)}, "not an XLabs LoRA key"),
])
def test_bad_keys_name_the_file_and_key(sd, match):
    with pytest.raises(OSError, match=match):
        convert(sd, "f")
