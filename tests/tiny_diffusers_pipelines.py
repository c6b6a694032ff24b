"""Tiny StableDiffusion3Pipeline and WanPipeline folders built and saved BY DIFFUSERS, for tests.

Text encoders come from transformers configs and the character tokenizers of
tests/tiny_pipeline.py, so nothing downloads. SD3 draws 8x8 images at its own default size
(the transformer's sample_size x the VAE's scale factor, 1); Wan is called with explicit small
sizes (its defaults are 480x832, 81 frames).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_families import randomize
from tests.tiny_pipeline import tiny_clip_tokenizer, tiny_t5_tokenizer

WAN_CALL = dict(height=16, width=16, num_frames=5, max_sequence_length=16)


def _clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77)).eval()


def _t5(cls_name: str, seed: int):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("EncoderModel", "Config"))
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config_cls(
        vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).eval()


def build_sd3_pipeline_dir(path) -> Path:
    """A StableDiffusion3Pipeline (three text encoders) saved by diffusers at ``path``."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, caption_projection_dim=64, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8)
    randomize(transformer, seed=0, scale=0.05)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(sample_size=8, in_channels=3, out_channels=3,
                                  block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                                  shift_factor=0.0609, scaling_factor=1.5035)
    diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip(2), text_encoder_2=_clip(3), text_encoder_3=_t5("T5EncoderModel", 4),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer()).save_pretrained(path)
    return Path(path)


def build_wan_pipeline_dir(path) -> Path:
    """A Wan 2.1 text-to-video pipeline (UMT5 text encoder, Wan VAE) saved by diffusers."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    randomize(transformer, seed=0, scale=0.05)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    diffusers.WanPipeline(
        transformer=transformer, vae=vae, text_encoder=_t5("UMT5EncoderModel", 2),
        tokenizer=tiny_t5_tokenizer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    ).save_pretrained(path)
    return Path(path)
