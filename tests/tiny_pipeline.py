"""A whole tiny FluxPipeline built and saved BY DIFFUSERS, for tests (nothing downloads).

``build_tiny_flux_pipeline_dir(tmp_path / "pipe")`` writes diffusers' on-disk layout
(model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
scheduler/) with float32 weights that are a pure function of ``seed``. Tokenizers are built in
code from a tiny vocabulary (lowercase letters, digits, punctuation) through transformers' own
classes, so they save and load like real ones.

Images are 32x32 (the default sample size): the VAE downsamples by 2 (vae_scale_factor 2) and
the transformer sees 8x8 = 64 packed tokens. Call the pipeline with a short
``max_sequence_length`` (e.g. 16) to keep T5 cheap.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_PROMPT = "a red circle above a blue square"
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"

TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                          num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                          axes_dims_rope=(4, 6, 6))
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                  scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                  use_post_quant_conv=False)
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                        max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                        use_dynamic_shifting=True)


def tiny_clip_tokenizer():
    """A CLIP byte-pair tokenizer over single characters plus a few merges; 77 tokens long."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in _CHARS:
            vocab[c + suffix] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("a", "n"), ("t", "h")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_t5_tokenizer():
    """A T5 unigram tokenizer over single characters and word starts."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    pieces += [("\u2581a", -1.0), ("\u2581red", -1.0), ("\u2581blue", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_flux_components(seed: int = 0) -> dict:
    """The seven FluxPipeline components as diffusers/transformers objects (float32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1, layer_norm_eps=1e-5))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder.eval(),
                text_encoder_2=text_encoder_2.eval(), tokenizer=tiny_clip_tokenizer(),
                tokenizer_2=tiny_t5_tokenizer(),
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))


def build_tiny_flux_pipeline_dir(path, seed: int = 0) -> Path:
    """Build a tiny diffusers FluxPipeline and save it (diffusers' save_pretrained) at ``path``.

    Example:
        >>> d = build_tiny_flux_pipeline_dir(tmp_path / "pipe")       # doctest: +SKIP
        >>> FluxPipeline.from_pretrained(d)(TINY_PROMPT, num_inference_steps=2,
        ...     max_sequence_length=16, output_type="np").images.shape     # doctest: +SKIP
        (1, 32, 32, 3)
    """
    from diffusers import FluxPipeline

    path = Path(path)
    FluxPipeline(**tiny_flux_components(seed)).save_pretrained(path)
    return path
