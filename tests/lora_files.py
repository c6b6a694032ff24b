"""Tiny LoRA files in the formats Flux LoRAs are shared in, shaped for tests/tiny_pipeline.py's
transformer (width 32, MLP 128, 1 double + 1 single block) and CLIP encoder (width 32, MLP 37).

Every builder is a pure function of its seed. ``bf16`` factors and alphas mimic real files.
"""

from __future__ import annotations

import torch

from tests.tiny_pipeline import TRANSFORMER_CONFIG

DIM, MLP = 32, 128           # the tiny transformer's width and single-block MLP width
CLIP_DIM, CLIP_MLP = 32, 37  # the tiny CLIP encoder's
# BFL / kohya module -> (out, in) of the tiny transformer (qkv and linear1 fused)
BFL_SHAPES = {
    "double_blocks.0.img_attn.qkv": (3 * DIM, DIM), "double_blocks.0.img_attn.proj": (DIM, DIM),
    "double_blocks.0.img_mlp.0": (4 * DIM, DIM), "double_blocks.0.img_mlp.2": (DIM, 4 * DIM),
    "double_blocks.0.img_mod.lin": (6 * DIM, DIM), "double_blocks.0.txt_attn.qkv": (3 * DIM, DIM),
    "double_blocks.0.txt_attn.proj": (DIM, DIM), "double_blocks.0.txt_mlp.0": (4 * DIM, DIM),
    "double_blocks.0.txt_mlp.2": (DIM, 4 * DIM), "double_blocks.0.txt_mod.lin": (6 * DIM, DIM),
    "single_blocks.0.linear1": (3 * DIM + MLP, DIM), "single_blocks.0.linear2": (DIM, DIM + MLP),
    "single_blocks.0.modulation.lin": (3 * DIM, DIM),
}
NO_LINEAR1 = {k: v for k, v in BFL_SHAPES.items() if "linear1" not in k}  # diffusers splits it
# by Flux.1's sizes, so its converter fails on it at a tiny size
EMBEDDERS = {"img_in": (DIM, TRANSFORMER_CONFIG["in_channels"]),
             "txt_in": (DIM, TRANSFORMER_CONFIG["joint_attention_dim"]),
             "time_in.in_layer": (DIM, 256), "guidance_in.out_layer": (DIM, DIM),
             "final_layer.linear": (TRANSFORMER_CONFIG["in_channels"], DIM),
             "final_layer.adaLN_modulation.1": (2 * DIM, DIM)}
CLIP_SHAPES = {"self_attn_q_proj": (CLIP_DIM, CLIP_DIM), "self_attn_out_proj": (CLIP_DIM, CLIP_DIM),
               "mlp_fc1": (CLIP_MLP, CLIP_DIM), "mlp_fc2": (CLIP_DIM, CLIP_MLP)}


def _factors(g, out, inp, rank, dtype, std=0.1):
    return ((torch.randn(rank, inp, generator=g) * std).to(dtype),
            (torch.randn(out, rank, generator=g) * std).to(dtype))


def kohya(seed=0, rank=4, alpha=2.0, modules=None, dtype=torch.bfloat16, clip=True,
          comfy=False) -> dict:
    """sd-scripts' names (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), or with
    ``comfy`` ComfyUI's (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (out, inp) in (modules or BFL_SHAPES).items():
        name = f"diffusion_model.{module}" if comfy else "lora_unet_" + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = \
            _factors(g, out, inp, rank, dtype)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if clip:
        for layer in range(2):
            for module, (out, inp) in CLIP_SHAPES.items():
                name = f"lora_te1_text_model_encoder_layers_{layer}_{module}"
                sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = \
                    _factors(g, out, inp, rank, dtype)
                sd[f"{name}.alpha"] = torch.tensor(alpha or rank, dtype=dtype)
    return sd


def xlabs(seed=0, rank=4) -> dict:
    """XLabs' processor LoRA (``double_blocks.0.processor.qkv_lora1.down.weight`` ...)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for proc, out in (("qkv_lora1", 3 * DIM), ("qkv_lora2", 3 * DIM), ("proj_lora1", DIM),
                      ("proj_lora2", DIM)):
        down, up = _factors(g, out, DIM, rank, torch.float32)
        sd[f"double_blocks.0.processor.{proc}.down.weight"] = down
        sd[f"double_blocks.0.processor.{proc}.up.weight"] = up
    for proc, out in (("qkv_lora", 3 * DIM), ("proj_lora", DIM)):
        down, up = _factors(g, out, DIM, rank, torch.float32)
        sd[f"single_blocks.0.processor.{proc}.down.weight"] = down
        sd[f"single_blocks.0.processor.{proc}.up.weight"] = up
    return sd


def bfl_peft(seed=0, rank=4, alpha=None, prefix="diffusion_model.") -> dict:
    """BFL names with PEFT factors (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (out, inp) in {**BFL_SHAPES, **EMBEDDERS}.items():
        sd[f"{prefix}{module}.lora_A.weight"], sd[f"{prefix}{module}.lora_B.weight"] = \
            _factors(g, out, inp, rank, torch.float32)
        if alpha is not None:
            sd[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_format(model, seed=0, rank=4, std=0.1, component="transformer", alpha=None,
                     where=lambda name: True) -> dict:
    """``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` for every nn.Linear of
    ``model`` that ``where(name)`` accepts (a diffusers, PEFT or ai-toolkit file)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and where(name):
            sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"] = \
                _factors(g, m.out_features, m.in_features, rank, torch.float32, std)
            if alpha is not None:
                sd[f"{component}.{name}.alpha"] = torch.tensor(float(alpha))
    return sd
