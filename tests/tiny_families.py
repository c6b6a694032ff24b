"""Tiny random models of the diffusers families diffquant loads through diffusers, for tests.

Each ``Family`` names diffusers' class, a config small enough to run in milliseconds yet with
its nn.Linear weights dominating (so an int8 footprint is meaningfully below bf16), and the
forward inputs. ``save(family, directory)`` writes a bf16 checkpoint with diffusers'
``save_pretrained``; weights are a pure function of the seed. Widths are multiples of 32, so
GGUF's blocks and ModelOpt's groups fit every quantized layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class Family:
    name: str            # test id
    class_name: str      # diffusers' model class
    config: dict
    inputs: Callable[[], dict]  # forward keyword arguments (bf16 tensors), return_dict=False


def _g():
    return torch.Generator().manual_seed(1)


def _bf16(*shape, g):
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


def _sd3_inputs():
    g = _g()
    return dict(hidden_states=_bf16(2, 4, 4, 4, g=g), encoder_hidden_states=_bf16(2, 5, 32, g=g),
                pooled_projections=_bf16(2, 32, g=g), timestep=torch.tensor([250.0, 800.0]))


def _qwen_inputs():
    g = _g()
    return dict(hidden_states=_bf16(2, 16, 16, g=g), encoder_hidden_states=_bf16(2, 5, 32, g=g),
                encoder_hidden_states_mask=torch.ones(2, 5, dtype=torch.long),
                timestep=torch.tensor([0.25, 0.8]), img_shapes=[[(1, 4, 4)]] * 2)


def _wan_inputs():
    g = _g()
    return dict(hidden_states=_bf16(2, 4, 1, 8, 8, g=g), encoder_hidden_states=_bf16(2, 5, 32, g=g),
                timestep=torch.tensor([250, 800]))


def _ltx_inputs():
    g = _g()
    return dict(hidden_states=_bf16(2, 4 * 4, 8, g=g), encoder_hidden_states=_bf16(2, 5, 32, g=g),
                timestep=torch.tensor([250, 800]), encoder_attention_mask=torch.ones(2, 5),
                num_frames=1, height=4, width=4)


def _unet_inputs():
    g = _g()
    return dict(sample=_bf16(2, 4, 4, 4, g=g), timestep=torch.tensor([250, 800]),
                encoder_hidden_states=_bf16(2, 5, 1024, g=g),
                added_cond_kwargs={"text_embeds": _bf16(2, 32, g=g), "time_ids": _bf16(2, 6, g=g)})


FAMILIES = [
    Family("sd3", "SD3Transformer2DModel", dict(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, caption_projection_dim=64, joint_attention_dim=32,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8), _sd3_inputs),
    Family("qwenimage", "QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12)), _qwen_inputs),
    Family("wan21", "WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=512, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32), _wan_inputs),
    Family("ltxvideo", "LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=2, caption_channels=32), _ltx_inputs),
    Family("sdxl_unet", "UNet2DConditionModel", dict(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None, layers_per_block=1, transformer_layers_per_block=2,
        attention_head_dim=(2,), cross_attention_dim=1024, norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8), _unet_inputs),
]


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random values for every parameter (diffusers zero-inits output layers, which would make
    outputs trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def build(family: Family, seed: int = 0):
    """diffusers' model of ``family`` with random weights, float32."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, family.class_name)(**family.config).eval()
    randomize(model, seed)
    return model


def save(family: Family, directory, seed: int = 0) -> Path:
    """Save ``family``'s random model in bf16 with diffusers' save_pretrained."""
    build(family, seed).to(torch.bfloat16).save_pretrained(directory)
    return Path(directory)


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
