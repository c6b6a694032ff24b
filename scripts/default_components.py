"""The small Flux-architecture pipeline that scripts/train_default.py trains and ships as
``diffquant.default_pipeline_path()``: its components' configs, Flux's packing and position ids,
the trained networks as one module (Denoiser), and the save into the diffusers layout.

Example:
    >>> clip_tok, t5_tok = build_tokenizers()                       # doctest: +SKIP
    >>> vae, transformer, clip, t5 = build_models(clip_tok, t5_tok)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shapes_data import MAX_TOKENS

try:  # the committed pipeline is built with diffquant's own classes (diffusers' names and format)
    from diffquant import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
except (ImportError, AttributeError):  # pragma: no cover - before diffquant had its models
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

SIZE = 64                       # image side; latents are SIZE/8 = 8, packed tokens (8/2)^2 = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(clip_tok, t5_tok):
    """Fresh (vae, transformer, clip, t5) with the shipped configs."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id))
    return vae, transformer, clip, t5


def build_scheduler():
    """Flux's scheduler settings; the pipeline derives mu from the 16-token image length."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def pack(z: torch.Tensor) -> torch.Tensor:
    """Flux 2x2 packing: [B, C, H, W] -> [B, (H/2)(W/2), 4C] (as FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids (0, row, col), as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class Denoiser(torch.nn.Module):
    """The three trained networks as one module, called exactly as FluxPipeline calls them."""

    def __init__(self, transformer, clip, t5):
        super().__init__()
        self.transformer, self.clip, self.t5 = transformer, clip, t5
        self.register_buffer("img_ids", image_ids(SIZE // 8, SIZE // 8), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(MAX_TOKENS, 3), persistent=False)

    def forward(self, x_t, t, clip_ids, t5_ids, return_text: bool = False):
        pooled = self.clip(clip_ids).pooler_output                   # [B, 64]
        ctx = self.t5(t5_ids)[0]                                     # [B, 16, 64], no mask, as the pipeline
        v = self.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=ctx,
                             pooled_projections=pooled, img_ids=self.img_ids,
                             txt_ids=self.txt_ids, return_dict=False)[0]
        return (v, pooled, ctx) if return_text else v


def save_pipeline(out: Path, vae, net: Denoiser, clip_tok, t5_tok) -> None:
    """Write the diffusers layout through the pipeline class's own save_pretrained."""
    try:
        from diffquant import FluxPipeline
    except (ImportError, AttributeError):  # pragma: no cover - before diffquant had its pipeline
        from diffusers import FluxPipeline
    pipe = FluxPipeline(scheduler=build_scheduler(), vae=vae, text_encoder=net.clip,
                        tokenizer=clip_tok, text_encoder_2=net.t5, tokenizer_2=t5_tok,
                        transformer=net.transformer)
    pipe.save_pretrained(str(out))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved pipeline to {out} ({size / 1e6:.1f} MB)")
