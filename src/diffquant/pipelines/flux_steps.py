"""The steps every Flux-family pipeline takes (FluxPipeline, FluxKontextPipeline and
ChromaPipeline share them), each diffusers 0.42.1's computation: the call's prelude, tokenizing,
latent ids, packing 2x2 patches, noise, the flow-match timesteps with Flux's shift ``mu``, the
denoising loop, and the VAE decode with its post-processing.

Example:
    >>> from diffquant.pipelines.flux_steps import calculate_shift
    >>> round(calculate_shift(4096), 2)
    1.15
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..models.autoencoder_kl import randn_like_diffusers

# FluxPipeline's logger: its warnings keep the name a user filters them by
logger = logging.getLogger("diffquant.pipelines.flux")


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
