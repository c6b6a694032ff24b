"""FluxPipeline: text -> image with Flux.1, step for step the computation of diffusers 0.42.1.

Prompt -> CLIP pooled embedding + T5 sequence embedding; Gaussian latents packed into 2x2
patches; the flow-matching Euler loop (with the resolution-dependent shift ``mu``); unpack,
undo the VAE scaling and shift, decode. Nothing here knows about quantization: quantized
components compute in their own forward.

Example:
    >>> import torch
    >>> from diffquant import FluxPipeline
    >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell",  # doctest: +SKIP
    ...                                     torch_dtype=torch.bfloat16)
    >>> image = pipe("a red circle above a blue square", num_inference_steps=4,  # doctest: +SKIP
    ...              guidance_scale=0.0, generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..lora.pipeline import FluxLoraLoaderMixin
from ..lora.text_encoder import call_scale as text_encoder_lora_scale
from ..outputs import BaseOutput
from ..pipeline import DiffusionPipeline
# the shared steps, re-exported: users import them (calculate_shift ...) from here
from .flux_steps import (  # noqa: F401
    batch_size_of, call_prelude, calculate_shift, decode_packed_latents, denoise,
    flow_match_timesteps, pack_latents, postprocess_image, prepare_latent_image_ids,
    prepare_packed_latents, refuse_what_diffquant_lacks, tokenize, transformer_cast,
    unpack_latents)

logger = logging.getLogger(__name__)


@dataclass
class FluxPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an array [B, H, W, 3] in [0, 1], a tensor [B, 3, H, W]
    in [0, 1], or packed latents [B, S, C] for ``output_type="latent"``."""

    images: object


class FluxPipeline(FluxLoraLoaderMixin, DiffusionPipeline):
    """Flux.1 text-to-image (dev, schnell and their quantized variants)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 transformer, image_encoder=None, feature_extractor=None):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                              transformer=transformer, scheduler=scheduler,
                              image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
        self.default_sample_size = 128  # diffusers' fixed default: 1024 px with Flux's VAE

    # -- prompt ------------------------------------------------------------------------------
    def _tokenize(self, tokenizer, prompt: list[str], max_length: int) -> torch.Tensor:
        return tokenize(tokenizer, prompt, max_length).input_ids            # [B, max_length]

    def _get_t5_prompt_embeds(self, prompt, num_images_per_prompt=1, max_sequence_length=512,
                              device=None):
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        ids = self._tokenize(self.tokenizer_2, prompt, max_sequence_length)
        embeds = self.text_encoder_2(ids.to(self._onload(self.text_encoder_2)),
                                     output_hidden_states=False)[0]           # [B, T, D]
        embeds = embeds.to(dtype=self.text_encoder_2.dtype, device=device)
        _, seq_len, _ = embeds.shape
        embeds = embeds.repeat(1, num_images_per_prompt, 1)
        return embeds.view(len(prompt) * num_images_per_prompt, seq_len, -1)  # [B*n, T, D]

    def _get_clip_prompt_embeds(self, prompt, num_images_per_prompt=1, device=None):
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        ids = self._tokenize(self.tokenizer, prompt, self.tokenizer_max_length)
        pooled = self.text_encoder(ids.to(self._onload(self.text_encoder)),
                                   output_hidden_states=False).pooler_output  # [B, D]
        pooled = pooled.to(dtype=self.text_encoder.dtype, device=device)
        pooled = pooled.repeat(1, num_images_per_prompt)
        return pooled.view(len(prompt) * num_images_per_prompt, -1)          # [B*n, D]

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
                      prompt_embeds=None, pooled_prompt_embeds=None,
                      max_sequence_length: int = 512, lora_scale=None):
        """(T5 embeddings [B*n, T, D], CLIP pooled [B*n, D], text ids [T, 3]).

        Example:
            >>> embeds, pooled, text_ids = pipe.encode_prompt("a cat", max_sequence_length=64)  # doctest: +SKIP
        """
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        if prompt_embeds is None:
            prompt_2 = prompt_2 or prompt
            prompt_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2
            with text_encoder_lora_scale(self.text_encoder, lora_scale):  # LoRA on CLIP
                pooled_prompt_embeds = self._get_clip_prompt_embeds(prompt, num_images_per_prompt,
                                                                    device)
            prompt_embeds = self._get_t5_prompt_embeds(prompt_2, num_images_per_prompt,
                                                       max_sequence_length, device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    # -- latents -----------------------------------------------------------------------------
    _prepare_latent_image_ids = staticmethod(prepare_latent_image_ids)
    _pack_latents = staticmethod(pack_latents)
    _unpack_latents = staticmethod(unpack_latents)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device,
                        generator, latents=None):
        """Packed Gaussian latents [B, S, C*4] (or ``latents`` as given) and image ids [S, 3]."""
        return prepare_packed_latents(self.vae_scale_factor, batch_size, num_channels_latents,
                                      height, width, dtype, device, generator, latents)

    # -- checks ------------------------------------------------------------------------------
    def check_inputs(self, prompt, prompt_2, height, width, prompt_embeds=None,
                     pooled_prompt_embeds=None, max_sequence_length=None, output_type="pil"):
        if height % (self.vae_scale_factor * 2) or width % (self.vae_scale_factor * 2):
            logger.warning("height and width should be divisible by %d but are %d and %d; the image "
                           "is resized accordingly", self.vae_scale_factor * 2, height, width)
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either prompt or prompt_embeds, not both")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("give either prompt_2 or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or a list of strings) or prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt should be a str or a list of str, got {type(prompt).__name__}")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (both come from "
                             "encode_prompt)")
        if max_sequence_length is not None and max_sequence_length > 512:
            raise ValueError(f"max_sequence_length is {max_sequence_length}; at most 512")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'pil', 'np', 'pt' or 'latent'")

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, sigmas: list[float] | None = None,
                 guidance_scale: float = 3.5, num_images_per_prompt: int = 1, generator=None,
                 latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512,
                 joint_attention_kwargs: dict | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                 negative_ip_adapter_image_embeds=None):
        """Generate images for ``prompt``; returns FluxPipelineOutput(images=...).

        Example:
            >>> out = pipe(["a cat", "a dog"], num_images_per_prompt=2, height=512, width=512,  # doctest: +SKIP
            ...            num_inference_steps=4, output_type="np")
            >>> out.images.shape                                                           # doctest: +SKIP
            (4, 512, 512, 3)

        diffusers' arguments are all taken. ``joint_attention_kwargs={"scale": s}`` scales the
        loaded LoRAs for this call (transformer and CLIP); its other keys reach attention
        processors in diffusers, which diffquant has not: they are ignored with a warning.
        IP-Adapter images are refused: there is no image encoder to take them.
        """
        height, width = call_prelude(
            self, height, width, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds, pooled_prompt_embeds,
                          max_sequence_length, output_type)
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device
        embeds, negative = self._encode_with_negative(
            prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, prompt_embeds,
            pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length)
        latents, image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels // 4, height,
            width, embeds[0].dtype, device, generator, latents)              # [B, S, C*4], [S, 3]
        timesteps = flow_match_timesteps(self.scheduler, num_inference_steps, sigmas,
                                         latents.shape[1], device)
        self._num_timesteps = len(timesteps)
        latents = self._denoise(latents, image_ids, timesteps, embeds, negative,
                                self._guidance(guidance_scale, latents.shape[0], device),
                                true_cfg_scale, callback_on_step_end,
                                callback_on_step_end_tensor_inputs)
        image = latents if output_type == "latent" else \
            decode_packed_latents(self, latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)

    def _encode_with_negative(self, prompt, prompt_2, negative_prompt, negative_prompt_2,
                              true_cfg_scale, prompt_embeds, pooled_prompt_embeds,
                              negative_prompt_embeds, negative_pooled_prompt_embeds, **encode):
        """encode_prompt's (embeds, pooled, text ids) for the prompt, and for the negative prompt
        where true CFG runs (``true_cfg_scale > 1`` and a negative prompt given), else None."""
        encode["lora_scale"] = (self.joint_attention_kwargs or {}).get("scale")
        embeds = self.encode_prompt(prompt, prompt_2, prompt_embeds=prompt_embeds,
                                    pooled_prompt_embeds=pooled_prompt_embeds, **encode)
        negative = None
        if true_cfg_scale > 1 and (negative_prompt is not None or (
                negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)):
            negative = self.encode_prompt(negative_prompt, negative_prompt_2,
                                          prompt_embeds=negative_prompt_embeds,
                                          pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode)
        return embeds, negative

    def _guidance(self, guidance_scale, batch_size, device):
        """[B] guidance scales for a guidance-distilled transformer (dev), else None."""
        if not self.transformer.config.guidance_embeds:
            return None
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
        return guidance.expand(batch_size)

    def _denoise(self, latents, image_ids, timesteps, embeds, negative, guidance, true_cfg_scale,
                 callback_on_step_end, callback_on_step_end_tensor_inputs, image_latents=None):
        """The denoising loop over packed latents [B, S, C*4].

        ``embeds`` and ``negative`` are encode_prompt's (embeds, pooled, text ids); with
        ``negative`` (true CFG) each step also predicts for it. ``image_latents`` [B, S', C*4]
        (Kontext's reference image) join the sequence after the latents, with their ids already
        at the end of ``image_ids``; the prediction for them is dropped.
        """
        pooled_prompt_embeds, text_ids = embeds[1:]
        cast = transformer_cast(self.transformer)

        def predict(state, timestep, use_negative):
            latents = state["latents"]
            embeds, pooled, ids = negative if use_negative else \
                (state["prompt_embeds"], pooled_prompt_embeds, text_ids)
            model_input = latents if image_latents is None else \
                torch.cat([latents, image_latents], dim=1)                       # [B, S+S', C*4]
            out = self.transformer(hidden_states=cast(model_input), timestep=timestep / 1000,
                                   guidance=guidance, pooled_projections=cast(pooled),
                                   encoder_hidden_states=cast(embeds), txt_ids=ids,
                                   img_ids=image_ids, return_dict=False,
                                   joint_attention_kwargs=self.joint_attention_kwargs)[0]
            return out[:, :latents.shape[1]].to(latents.dtype)

        state = {"latents": latents, "prompt_embeds": embeds[0]}
        return denoise(self, state, timesteps, predict,
                       true_cfg_scale if negative is not None else None, callback_on_step_end,
                       callback_on_step_end_tensor_inputs)
