"""Tiny Chroma and Flux Kontext pipelines built BY DIFFUSERS, for tests (nothing downloads).

Chroma: tests/tiny_pipeline.py's VAE, T5 and T5 tokenizer with a tiny ChromaTransformer2DModel.
Kontext: FluxPipeline's tiny components under diffusers' FluxKontextPipeline. Weights are float32
and a pure function of ``seed``; images are 32x32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_pipeline import TRANSFORMER_CONFIG, tiny_flux_components

CHROMA_CONFIG = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                     num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                     approximator_num_channels=16, approximator_hidden_dim=32,
                     approximator_layers=2)
assert TRANSFORMER_CONFIG["joint_attention_dim"] == CHROMA_CONFIG["joint_attention_dim"]


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (diffusers' init leaves norms at one and some biases at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_chroma_components(seed: int = 0) -> dict:
    """The five ChromaPipeline components as diffusers/transformers objects (float32)."""
    from diffusers import ChromaTransformer2DModel

    flux = tiny_flux_components(seed)
    torch.manual_seed(seed)
    transformer = randomize(ChromaTransformer2DModel(**CHROMA_CONFIG), seed, scale=0.1)
    return dict(transformer=transformer.eval(), vae=flux["vae"],
                text_encoder=flux["text_encoder_2"], tokenizer=flux["tokenizer_2"],
                scheduler=flux["scheduler"])


def build_tiny_chroma_pipeline_dir(path, seed: int = 0) -> Path:
    """Build a tiny diffusers ChromaPipeline and save it with diffusers at ``path``."""
    from diffusers import ChromaPipeline

    path = Path(path)
    ChromaPipeline(**tiny_chroma_components(seed)).save_pretrained(path)
    return path


def build_tiny_kontext_pipeline_dir(path, seed: int = 0) -> Path:
    """Build a tiny diffusers FluxKontextPipeline and save it with diffusers at ``path``."""
    from diffusers import FluxKontextPipeline

    path = Path(path)
    FluxKontextPipeline(**tiny_flux_components(seed)).save_pretrained(path)
    return path
