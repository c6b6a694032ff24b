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

import numpy as np
import torch

from ..lora.pipeline import FluxLoraLoaderMixin
from ..lora.text_encoder import call_scale as text_encoder_lora_scale
from ..models.autoencoder_kl import randn_like_diffusers
from ..outputs import BaseOutput
from ..pipeline import DiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass
class FluxPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an array [B, H, W, 3] in [0, 1], a tensor [B, 3, H, W]
    in [0, 1], or packed latents [B, S, C] for ``output_type="latent"``."""

    images: object


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu grows linearly with the number of image tokens (Flux's resolution-dependent shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def postprocess_image(image: torch.Tensor, output_type: str):
    """VAE output [B, 3, H, W] in [-1, 1] -> [0, 1] as a tensor, array [B, H, W, 3] or PIL list."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type={output_type!r}; expected 'pil', 'np', 'pt' or 'latent'")
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return image
    from PIL import Image

    return [Image.fromarray(x) for x in (image * 255).round().astype("uint8")]


def call_prelude(pipe, height, width, joint_attention_kwargs, **adapters) -> tuple[int, int]:
    """What every Flux-family ``__call__`` does first: keep ``joint_attention_kwargs`` for the
    transformer calls (its ``"scale"`` scales the LoRAs), refuse diffusers' arguments for
    features diffquant has not (``refuse_what_diffquant_lacks``); returns (height, width), each
    defaulting to the pipeline's sample size in pixels."""
    pipe._joint_attention_kwargs = joint_attention_kwargs
    refuse_what_diffquant_lacks(pipe, **adapters)
    return (height or pipe.default_sample_size * pipe.vae_scale_factor,
            width or pipe.default_sample_size * pipe.vae_scale_factor)


def refuse_what_diffquant_lacks(pipe, **adapters) -> None:
    """diffusers' __call__ arguments for IP-Adapter, which diffquant has not: refused."""
    name = type(pipe).__name__
    given = sorted(k for k, v in adapters.items() if v is not None)
    if given:
        raise ValueError(f"{name}: {', '.join(given)} given, but diffquant's "
                         f"{name} has no IP-Adapter (no image encoder); drop them")


# -- steps every Flux-family pipeline takes (FluxKontextPipeline, ChromaPipeline share them) --
def batch_size_of(prompt, prompt_embeds) -> int:
    """Prompts in the call: one string, a list, or the rows of ``prompt_embeds``."""
    return 1 if isinstance(prompt, str) else len(prompt) if prompt is not None \
        else prompt_embeds.shape[0]


def tokenize(tokenizer, prompt: list[str], max_length: int):
    """The tokenizer's output padded to ``max_length`` (``input_ids``, ``attention_mask``, each
    [B, max_length]); warns with the part of a prompt that was cut."""
    out = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    ids = out.input_ids
    full = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
        removed = tokenizer.batch_decode(full[:, max_length - 1:-1])
        logger.warning("this part of the prompt was cut at %d tokens: %s", max_length, removed)
    return out


def prepare_latent_image_ids(batch_size, height, width, device, dtype) -> torch.Tensor:
    """(0, row, col) per packed token: [height * width, 3]."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def pack_latents(latents, batch_size, num_channels_latents, height, width) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]: each 2x2 patch becomes one token."""
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)


def unpack_latents(latents, height, width, vae_scale_factor) -> torch.Tensor:
    """[B, S, C*4] -> [B, C, h, w] for an image of height x width pixels."""
    batch_size, _, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // 4, height, width)


def prepare_packed_latents(vae_scale_factor, batch_size, num_channels_latents, height, width,
                           dtype, device, generator, latents=None):
    """Packed Gaussian latents [B, S, C*4] (or ``latents`` as given) and image ids [S, 3]."""
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    image_ids = prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
    if latents is not None:
        return latents.to(device=device, dtype=dtype), image_ids
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for an effective batch of "
                         f"{batch_size} images; pass one per image or a single one")
    shape = (batch_size, num_channels_latents, height, width)
    latents = randn_like_diffusers(shape, generator=generator, device=device, dtype=dtype)
    return pack_latents(latents, batch_size, num_channels_latents, height, width), image_ids


def flow_match_timesteps(scheduler, num_inference_steps, sigmas, image_seq_len, device):
    """Set the scheduler's sigmas (1 -> 1/n by default) shifted by ``mu`` for this many image
    tokens; returns its timesteps."""
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) \
        if sigmas is None else sigmas
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                         cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return scheduler.timesteps


def transformer_cast(transformer):
    """The cast of the transformer's float inputs: to its dtype when it is unquantized.

    The transformer may hold another dtype than the text encoders (torch_dtype={"transformer":
    torch.bfloat16, "default": torch.float32}): an unquantized one then gets its inputs in its
    dtype, where diffusers fails on its first product. A quantized one takes them as they come,
    as in diffusers (its layers decide: torchao's multiply in the input's dtype). With one dtype
    throughout the cast does nothing."""
    if getattr(transformer, "is_quantized", False):
        return lambda t: t
    dtype = transformer.dtype
    return lambda t: t.to(dtype)


def denoise(pipe, state: dict, timesteps, predict, cfg_scale=None, callback_on_step_end=None,
            callback_on_step_end_tensor_inputs=("latents",)) -> torch.Tensor:
    """The flow-matching Euler loop: ``state["latents"]`` [B, S, C*4] in, the final latents out.

    ``predict(state, timestep, negative)`` is the transformer's prediction (in the latents'
    dtype) for the prompt or, with ``negative``, the negative prompt; with ``cfg_scale`` (true
    CFG) each step extrapolates away from the negative one. ``state`` also holds
    ``prompt_embeds``, which a step-end callback may replace as it may the latents.
    """
    pipe.scheduler.set_begin_index(0)
    with pipe.progress_bar(total=len(timesteps)) as bar:
        for i, t in enumerate(timesteps):
            latents = state["latents"]
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = predict(state, timestep, False)
            if cfg_scale is not None:
                neg = predict(state, timestep, True)
                noise_pred = neg + cfg_scale * (noise_pred - neg)
            state["latents"] = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(pipe, i, t, {k: state[k] for k in
                                                        callback_on_step_end_tensor_inputs})
                for key in ("latents", "prompt_embeds"):
                    state[key] = out.pop(key, state[key])
            bar.update()
    return state["latents"]


def decode_packed_latents(pipe, latents, height, width, output_type):
    """Packed latents [B, S, C*4] -> images through the pipeline's VAE, as ``output_type``."""
    latents = unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [B, C, h, w]
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    latents = latents.to(pipe._onload(pipe.vae)).to(pipe.vae.dtype)  # its dtype may differ
    image = pipe.vae.decode(latents, return_dict=False)[0]               # [B, 3, H, W]
    return postprocess_image(image, output_type)


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
