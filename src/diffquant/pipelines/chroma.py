"""ChromaPipeline: text -> image with Chroma, step for step the computation of diffusers 0.42.1.

Chroma is Flux.1 with T5 as its only text encoder (no CLIP pooled embedding, no guidance
embedding) and real classifier-free guidance: every step predicts for the prompt and for the
negative prompt (default "") when ``guidance_scale > 1``. The T5 pass masks the prompt's padding;
the transformer gets a mask over [text; image] that keeps the prompt and its first padding token.
Latents, timesteps, the loop and decoding are FluxPipeline's shared steps (pipelines/flux_steps.py).

That mask is float, as diffusers makes it, and SDPA adds a float mask to the attention scores
(+1 for kept tokens, +0 for the others) instead of dropping tokens: diffusers issue #12116,
reopened as #13619. It is kept for equal images; pass ``prompt_attention_mask`` (and
``negative_prompt_attention_mask``) as bool [B, T] tensors to drop the padding outright.

Example:
    >>> import torch
    >>> from diffquant import ChromaPipeline
    >>> pipe = ChromaPipeline.from_pretrained("lodestones/Chroma1-HD", torch_dtype=torch.bfloat16)  # doctest: +SKIP
    >>> image = pipe("a red circle above a blue square", negative_prompt="blurry",  # doctest: +SKIP
    ...              num_inference_steps=28, generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import logging

import torch

from ..lora.pipeline import FluxLoraLoaderMixin
from ..pipeline import DiffusionPipeline
from .flux import FluxPipelineOutput
from .flux_steps import (batch_size_of, call_prelude, decode_packed_latents, denoise,
                         flow_match_timesteps, pack_latents, prepare_latent_image_ids,
                         prepare_packed_latents, tokenize, transformer_cast, unpack_latents)

logger = logging.getLogger(__name__)


class ChromaPipelineOutput(FluxPipelineOutput):
    """``images``: as FluxPipelineOutput's."""


class ChromaPipeline(FluxLoraLoaderMixin, DiffusionPipeline):
    """Chroma text-to-image (Chroma1-HD, Chroma1-Base and their quantized variants)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, image_encoder=None,
                 feature_extractor=None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, scheduler=scheduler,
                              image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.default_sample_size = 128  # diffusers' fixed default: 1024 px with Flux's VAE

    _prepare_latent_image_ids = staticmethod(prepare_latent_image_ids)
    _pack_latents = staticmethod(pack_latents)
    _unpack_latents = staticmethod(unpack_latents)

    # -- prompt ------------------------------------------------------------------------------
    def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt: int = 1,
                              max_sequence_length: int = 512, device=None, dtype=None):
        """(T5 embeddings [B*n, T, D], the transformer's text mask [B*n, T] in ``dtype``)."""
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompt = [prompt] if isinstance(prompt, str) else prompt
        tokens = tokenize(self.tokenizer, prompt, max_sequence_length)
        on = self._onload(self.text_encoder)
        embeds = self.text_encoder(tokens.input_ids.to(on), output_hidden_states=False,
                                   attention_mask=tokens.attention_mask.to(on))[0]   # [B, T, D]
        embeds = embeds.to(dtype=dtype, device=device)
        # the transformer keeps the prompt's tokens and the first padding token
        lengths = tokens.attention_mask.to(device).sum(dim=1)                          # [B]
        positions = torch.arange(embeds.shape[1], device=device).unsqueeze(0).expand(len(prompt), -1)
        mask = (positions <= lengths.unsqueeze(1)).to(dtype=dtype, device=device)      # [B, T]
        seq_len = embeds.shape[1]
        embeds = embeds.repeat(1, num_images_per_prompt, 1)
        embeds = embeds.view(len(prompt) * num_images_per_prompt, seq_len, -1)
        mask = mask.repeat(1, num_images_per_prompt).view(len(prompt) * num_images_per_prompt, seq_len)
        return embeds, mask

    def encode_prompt(self, prompt, negative_prompt=None, device=None,
                      num_images_per_prompt: int = 1, prompt_embeds=None,
                      negative_prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_attention_mask=None, do_classifier_free_guidance: bool = True,
                      max_sequence_length: int = 512, lora_scale=None):
        """(embeds, text ids, mask, negative embeds, negative text ids, negative mask); the
        negative three are None without classifier-free guidance.

        Example:
            >>> embeds, ids, mask, *negative = pipe.encode_prompt("a cat", max_sequence_length=64)  # doctest: +SKIP
        """
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        encode = dict(num_images_per_prompt=num_images_per_prompt,
                      max_sequence_length=max_sequence_length, device=device)
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._get_t5_prompt_embeds(prompt, **encode)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        negative_text_ids = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt = negative_prompt or ""
                if isinstance(negative_prompt, str):
                    negative_prompt = batch_size * [negative_prompt]
                if prompt is not None and type(prompt) is not type(negative_prompt):
                    raise TypeError(f"negative_prompt is a {type(negative_prompt).__name__}, prompt "
                                    f"a {type(prompt).__name__}; give both as str or as list")
                if len(negative_prompt) != batch_size:
                    raise ValueError(f"negative_prompt has {len(negative_prompt)} prompts, prompt "
                                     f"{batch_size}; give as many or a single string")
                negative_prompt_embeds, negative_prompt_attention_mask = \
                    self._get_t5_prompt_embeds(negative_prompt, **encode)
            negative_text_ids = torch.zeros(negative_prompt_embeds.shape[1], 3).to(
                device=device, dtype=dtype)
        return (prompt_embeds, text_ids, prompt_attention_mask, negative_prompt_embeds,
                negative_text_ids, negative_prompt_attention_mask)

    # -- checks ------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, negative_prompt=None, prompt_embeds=None,
                     prompt_attention_mask=None, negative_prompt_embeds=None,
                     negative_prompt_attention_mask=None, max_sequence_length=None,
                     output_type="pil"):
        if height % (self.vae_scale_factor * 2) or width % (self.vae_scale_factor * 2):
            logger.warning("height and width should be divisible by %d but are %d and %d; the image "
                           "is resized accordingly", self.vae_scale_factor * 2, height, width)
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give prompt (a string or a list of strings) or prompt_embeds, "
                             "exactly one of them")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt should be a str or a list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
        for name, embeds, mask in (("prompt", prompt_embeds, prompt_attention_mask),
                                   ("negative_prompt", negative_prompt_embeds,
                                    negative_prompt_attention_mask)):
            if embeds is not None and mask is None:
                raise ValueError(f"{name}_embeds needs {name}_attention_mask too (both come from "
                                 "encode_prompt)")
        if max_sequence_length is not None and max_sequence_length > 512:
            raise ValueError(f"max_sequence_length is {max_sequence_length}; at most 512")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'pil', 'np', 'pt' or 'latent'")

    @staticmethod
    def _prepare_attention_mask(batch_size, sequence_length, dtype, attention_mask=None):
        """Text mask [B, T] -> [B, T + S] with every image token kept (None stays None)."""
        if attention_mask is None:
            return None
        image = torch.ones(batch_size, sequence_length, device=attention_mask.device, dtype=torch.bool)
        return torch.cat([attention_mask, image], dim=1)

    # -- generation --------------------------------------------------------------------------
    # Over 60 lines: diffusers' signature (24 arguments) and the docstring; the body is 44 lines
    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 35,
                 sigmas: list[float] | None = None, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1, generator=None, latents=None, prompt_embeds=None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None,
                 negative_ip_adapter_image=None, negative_ip_adapter_image_embeds=None,
                 negative_prompt_embeds=None, prompt_attention_mask=None,
                 negative_prompt_attention_mask=None, output_type: str = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 512):
        """Generate images for ``prompt``; returns ChromaPipelineOutput(images=...).

        Example:
            >>> out = pipe("a cat", negative_prompt="low quality", guidance_scale=4.0,  # doctest: +SKIP
            ...            height=512, width=512, num_inference_steps=8, output_type="np")

        Unsupported diffusers arguments are handled as in FluxPipeline.
        """
        height, width = call_prelude(
            self, height, width, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds,
                          prompt_attention_mask, negative_prompt_embeds,
                          negative_prompt_attention_mask, max_sequence_length, output_type)
        cfg = guidance_scale > 1
        device = self._execution_device
        embeds, text_ids, mask, neg_embeds, neg_text_ids, neg_mask = self.encode_prompt(
            prompt, negative_prompt, device, num_images_per_prompt, prompt_embeds,
            negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
            do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length)
        latents, image_ids = prepare_packed_latents(
            self.vae_scale_factor, batch_size_of(prompt, prompt_embeds) * num_images_per_prompt,
            self.transformer.config.in_channels // 4, height, width, embeds.dtype, device,
            generator, latents)                                               # [B, S, C*4], [S, 3]
        batch, image_seq_len = latents.shape[:2]
        mask = self._prepare_attention_mask(batch, image_seq_len, latents.dtype, mask)
        neg_mask = self._prepare_attention_mask(batch, image_seq_len, latents.dtype, neg_mask)
        timesteps = flow_match_timesteps(self.scheduler, num_inference_steps, sigmas,
                                         image_seq_len, device)
        self._num_timesteps = len(timesteps)
        cast = transformer_cast(self.transformer)
        maybe_cast = lambda t: t if t is None or not t.is_floating_point() else cast(t)  # noqa: E731

        def predict(state, timestep, negative):
            latents = state["latents"]
            text, ids, attention = (neg_embeds, neg_text_ids, neg_mask) if negative else \
                (state["prompt_embeds"], text_ids, mask)
            out = self.transformer(hidden_states=cast(latents), timestep=timestep / 1000,
                                   encoder_hidden_states=cast(text), txt_ids=ids, img_ids=image_ids,
                                   attention_mask=maybe_cast(attention), return_dict=False,
                                   joint_attention_kwargs=self.joint_attention_kwargs)[0]
            return out.to(latents.dtype)

        latents = denoise(self, {"latents": latents, "prompt_embeds": embeds}, timesteps, predict,
                          guidance_scale if cfg else None, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)
        image = latents if output_type == "latent" else \
            decode_packed_latents(self, latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return ChromaPipelineOutput(images=image) if return_dict else (image,)
