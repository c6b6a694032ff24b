"""FluxKontextPipeline: image editing with Flux.1 Kontext, step for step diffusers 0.42.1's.

The same components and transformer as FluxPipeline. The reference image is resized (to the
Kontext training resolution nearest its aspect ratio unless ``_auto_resize=False``), encoded by
the VAE (the posterior's mode), packed into 2x2 patches like the latents and appended to them
along the sequence, its ids marked with 1 in the first axis; the transformer's prediction for
those tokens is dropped. The output size follows ``max_area`` at the requested aspect ratio.
Everything else (prompt encoding, true CFG, guidance embedding, the loop, decoding) is
FluxPipeline's own.

Example:
    >>> import torch
    >>> from PIL import Image
    >>> from diffquant import FluxKontextPipeline
    >>> pipe = FluxKontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev",  # doctest: +SKIP
    ...                                            torch_dtype=torch.bfloat16)
    >>> edited = pipe(image=Image.open("cat.png"), prompt="add a hat to the cat",  # doctest: +SKIP
    ...               guidance_scale=2.5, generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .flux import FluxPipeline, FluxPipelineOutput
from .flux_steps import (batch_size_of, call_prelude, decode_packed_latents, flow_match_timesteps,
                         pack_latents, prepare_latent_image_ids, prepare_packed_latents)

logger = logging.getLogger(__name__)

# (width, height) pairs Kontext was trained at; diffusers' list
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
]


def output_size(height: int, width: int, max_area: int, multiple_of: int) -> tuple[int, int]:
    """(height, width) of ``max_area`` pixels at the aspect ratio asked for, each rounded down
    to a multiple of ``multiple_of``."""
    aspect_ratio = width / height
    width = round((max_area * aspect_ratio) ** 0.5)
    height = round((max_area / aspect_ratio) ** 0.5)
    return height // multiple_of * multiple_of, width // multiple_of * multiple_of


def reference_size(image, multiple_of: int, auto_resize: bool) -> tuple[int, int]:
    """(height, width) the reference image is resized to: its own size rounded down to a
    multiple of ``multiple_of``, or with ``auto_resize`` the preferred resolution nearest its
    aspect ratio."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, torch.Tensor):
        height, width = first.shape[2], first.shape[3]
    elif isinstance(first, np.ndarray):
        height, width = first.shape[1], first.shape[2]
    else:  # a PIL image
        height, width = first.height, first.width
    if height < multiple_of or width < multiple_of:
        raise ValueError(f"image: {width} x {height} pixels; Kontext needs at least "
                         f"{multiple_of} x {multiple_of}")
    height, width = height - height % multiple_of, width - width % multiple_of
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h)
                               for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // multiple_of * multiple_of, width // multiple_of * multiple_of


def preprocess_image(image, height: int, width: int) -> torch.Tensor:
    """PIL image(s) (resized with Lanczos), or values in [0, 1] as an array [B, H, W, C] or a
    tensor [B, C, H, W] (resized nearest) -> [B, C, height, width] in [-1, 1], as diffusers'
    VaeImageProcessor does. A tensor already below 0 is taken as in [-1, 1] and kept."""
    from PIL import Image

    if isinstance(image, Image.Image) or (isinstance(image, list) and image
                                          and all(isinstance(i, Image.Image) for i in image)):
        images = image if isinstance(image, list) else [image]
        arrays = np.stack([np.array(i.resize((width, height), resample=Image.Resampling.LANCZOS))
                           .astype(np.float32) / 255.0 for i in images])        # [B, H, W(, C)]
        arrays = arrays[..., None] if arrays.ndim == 3 else arrays
        x = torch.from_numpy(arrays.transpose(0, 3, 1, 2))
    elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        x = torch.from_numpy(image.transpose(0, 3, 1, 2)) if isinstance(image, np.ndarray) else image
        x = F.interpolate(x, size=(height, width))
        x = x.float() if isinstance(image, np.ndarray) else x  # diffusers' round trip via numpy
    else:
        kind = f"{type(image).__name__} of {image.ndim} dims" if hasattr(image, "ndim") \
            else type(image).__name__
        raise ValueError(f"image: got a {kind}; expected a PIL image or a list of them, an array "
                         "[B, H, W, C] or a tensor [B, C, H, W] with values in [0, 1], or VAE "
                         "latents [B, latent_channels, h, w]")
    if x.min() < 0:
        warnings.warn(f"image: values in [{x.min()}, {x.max()}]; taken as already in [-1, 1] "
                      "(diffusers deprecates this: pass [0, 1])", FutureWarning, stacklevel=3)
        return x
    return 2.0 * x - 1.0


class FluxKontextPipeline(FluxPipeline):
    """Flux.1 Kontext: edit ``image`` as ``prompt`` says (text-to-image without an image)."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 transformer, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         transformer, image_encoder, feature_extractor)
        self.latent_channels = vae.config.latent_channels if vae is not None else 16

    def _encode_vae_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f]: the posterior's mode, so
        the generator draws nothing (a list of them encodes image by image, as diffusers)."""
        dtype = image.dtype
        image = image.to(self._onload(self.vae)).to(self.vae.dtype)  # its dtype may differ
        parts = [image[i:i + 1] for i in range(image.shape[0])] if isinstance(generator, list) \
            else [image]
        latents = torch.cat([self.vae.encode(p).latent_dist.mode() for p in parts]).to(dtype)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def prepare_latents(self, image, batch_size, num_channels_latents, height, width, dtype,
                        device, generator=None, latents=None):
        """(latents [B, S, C*4], image latents [B, S', C*4] or None, latent ids [S, 3], image
        ids [S', 3] or None); ``image`` is preprocessed pixels or VAE latents."""
        image_latents = image_ids = None
        if image is not None:
            image = image.to(device=device, dtype=dtype)
            image_latents = image if image.shape[1] == self.latent_channels else \
                self._encode_vae_image(image, generator)
            if batch_size > image_latents.shape[0]:
                if batch_size % image_latents.shape[0]:
                    raise ValueError(f"cannot repeat {image_latents.shape[0]} images for "
                                     f"{batch_size} prompts x images per prompt; give one image "
                                     "or as many as prompts")
                image_latents = torch.cat([image_latents] * (batch_size // image_latents.shape[0]))
            h, w = image_latents.shape[2:]
            image_latents = pack_latents(image_latents, batch_size, num_channels_latents, h, w)
            image_ids = prepare_latent_image_ids(batch_size, h // 2, w // 2, device, dtype)
            image_ids[..., 0] = 1  # the reference image: first axis 1, the latents' is 0
        latents, latent_ids = prepare_packed_latents(
            self.vae_scale_factor, batch_size, num_channels_latents, height, width, dtype, device,
            generator, latents)
        return latents, image_latents, latent_ids, image_ids

    def _reference_image(self, image, auto_resize: bool):
        """The reference image as pixels [B, 3, H, W] in [-1, 1], or latents as given, or None."""
        if image is None or (isinstance(image, torch.Tensor) and image.ndim == 4
                             and image.size(1) == self.latent_channels):
            return image
        height, width = reference_size(image, self.vae_scale_factor * 2, auto_resize)
        return preprocess_image(image, height, width)

    def _check_negative(self, negative_prompt, negative_prompt_2, negative_prompt_embeds,
                        negative_pooled_prompt_embeds):
        if negative_prompt_embeds is not None and (negative_prompt is not None
                                                   or negative_prompt_2 is not None):
            raise ValueError("give either negative_prompt(_2) or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too "
                             "(both come from encode_prompt)")

    # Over 60 lines: diffusers' signature (30 arguments) and the docstring; the body is 41 lines
    @torch.no_grad()
    def __call__(self, image=None, prompt=None, prompt_2=None, negative_prompt=None,
                 negative_prompt_2=None, true_cfg_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 28,
                 sigmas: list[float] | None = None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, generator=None, latents=None, prompt_embeds=None,
                 pooled_prompt_embeds=None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                 negative_ip_adapter_image=None, negative_ip_adapter_image_embeds=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512,
                 max_area: int = 1024 ** 2, _auto_resize: bool = True):
        """Edit ``image`` (PIL, array, tensor or VAE latents) as ``prompt`` says; returns
        FluxPipelineOutput(images=...).

        Example:
            >>> out = pipe(image=img, prompt="make it night", max_area=512 ** 2,  # doctest: +SKIP
            ...            num_inference_steps=4, output_type="np")

        The output has ``max_area`` pixels at height:width's aspect ratio (default 1024 x 1024);
        the image is resized to the Kontext resolution nearest its aspect ratio, or with
        ``_auto_resize=False`` only rounded down to a multiple of 16 pixels. Unsupported
        diffusers arguments are handled as in FluxPipeline.
        """
        asked = call_prelude(
            self, height, width, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        height, width = output_size(*asked, max_area, self.vae_scale_factor * 2)
        if (height, width) != asked:
            logger.warning("height and width set to %d and %d (max_area=%d at the aspect ratio "
                           "asked for)", height, width, max_area)
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds, pooled_prompt_embeds,
                          max_sequence_length, output_type)
        self._check_negative(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                             negative_pooled_prompt_embeds)
        if true_cfg_scale > 1 and prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {list(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{list(negative_prompt_embeds.shape)} must have the same shape")
        batch = batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        device = self._execution_device
        embeds, negative = self._encode_with_negative(
            prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, prompt_embeds,
            pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length)
        latents, image_latents, latent_ids, image_ids = self.prepare_latents(
            self._reference_image(image, _auto_resize), batch,
            self.transformer.config.in_channels // 4, height, width, embeds[0].dtype, device,
            generator, latents)
        if image_ids is not None:
            latent_ids = torch.cat([latent_ids, image_ids], dim=0)              # [S + S', 3]
        timesteps = flow_match_timesteps(self.scheduler, num_inference_steps, sigmas,
                                         latents.shape[1], device)
        self._num_timesteps = len(timesteps)
        latents = self._denoise(latents, latent_ids, timesteps, embeds, negative,
                                self._guidance(guidance_scale, batch, device), true_cfg_scale,
                                callback_on_step_end, callback_on_step_end_tensor_inputs,
                                image_latents=image_latents)
        image = latents if output_type == "latent" else \
            decode_packed_latents(self, latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)
