"""AutoencoderKL: the KL VAE of Flux (and Stable Diffusion), numerically equal to diffusers 0.42.1.

One file: ResNet blocks, a single-head mid-block attention (``F.scaled_dot_product_attention``),
encoder, decoder and the diagonal Gaussian posterior. Module and parameter names equal diffusers'
so checkpoints load both ways. Tiling (``enable_tiling``: diffusers' tile sizes, overlap and
blending, ``vae_tiling.py``) and slicing (``enable_slicing``: one image of a batch at a time)
bound the memory of large images and batches.

Example:
    >>> import torch
    >>> from diffquant import AutoencoderKL
    >>> vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
    ...     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    >>> posterior = vae.encode(torch.randn(1, 3, 16, 16)).latent_dist
    >>> z = posterior.sample(generator=torch.Generator().manual_seed(0))
    >>> tuple(z.shape), tuple(vae.decode(z).sample.shape)
    ((1, 4, 8, 8), (1, 3, 16, 16))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import ConfigMixin, register_to_config
from ..modeling import ModelMixin
from ..outputs import BaseOutput
from .vae_tiling import tiled

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    if name.lower() not in _ACTIVATIONS:
        raise ValueError(f"act_fn={name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name.lower()]()


def randn_like_diffusers(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """torch.randn drawn as diffusers' randn_tensor does, so seeds give the same numbers.

    A CPU generator draws on the CPU and the result moves to ``device``; a list of generators
    draws one batch element from each.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gens = generator if isinstance(generator, list) else [generator]
    rand_device = device
    if gens[0] is not None and gens[0].device.type == "cpu" and device.type != "cpu":
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype)
                      for g in gens[:shape[0]]]).to(device)


class DiagonalGaussianDistribution:
    """The encoder's posterior: ``parameters`` [B, 2C, H, W] = mean and log-variance halves."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)         # each [B, C, H, W]
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list | None = None) -> torch.Tensor:
        noise = randn_like_diffusers(self.mean.shape, generator, self.parameters.device,
                                     self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, per batch element: [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


# -- building blocks -------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv, twice, plus a (1x1-projected when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = _activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (diffusers' padding=0 variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head self-attention over pixels with a GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)              # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).to(q.dtype)    # [B, HW, C]
        out = self.to_out[1](self.to_out[0](out))
        return out.transpose(-1, -2).reshape(b, c, h, w) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """Image [B, in, H, W] -> posterior parameters [B, 2*latent, H/2^(n-1), W/2^(n-1)]."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups,
                 act_fn, mid_block_add_attention):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(chans[max(i - 1, 0)], c, layers_per_block, groups, act_fn,
                               add_downsample=i < len(chans) - 1)
            for i, c in enumerate(chans))
        self.mid_block = UNetMidBlock2D(chans[-1], groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[-1], 2 * out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] -> image [B, out, h*2^(n-1), w*2^(n-1)]."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups,
                 act_fn, mid_block_add_attention):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, act_fn, mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, act_fn,
                             add_upsample=i < len(rev) - 1)
            for i, c in enumerate(rev))
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


# -- the model -------------------------------------------------------------------------------
class AutoencoderKL(ModelMixin, ConfigMixin):
    """KL VAE with diffusers' config arguments and state-dict keys.

    Flux latents for the transformer are ``(posterior.sample() - shift_factor) * scaling_factor``;
    the pipeline undoes that before ``decode``.

    Example:
        >>> from diffquant import AutoencoderKL
        >>> vae = AutoencoderKL.from_pretrained("flux_dir", subfolder="vae")  # doctest: +SKIP
    """

    _no_split_modules = ["ResnetBlock2D"]
    _keep_in_fp32_modules: list[str] = []

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
                 block_out_channels: tuple[int, ...] = (64,), layers_per_block: int = 1,
                 act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 32, scaling_factor: float = 0.18215,
                 shift_factor: float | None = None, latents_mean: tuple[float] | None = None,
                 latents_std: tuple[float] | None = None, force_upcast: bool = True,
                 use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        n = len(block_out_channels)
        for key, types, want in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", up_block_types, "UpDecoderBlock2D")):
            if len(types) != n or any(t != want for t in types):
                raise ValueError(f"{key}={list(types)}: diffquant's AutoencoderKL supports only "
                                 f"{n} x {want!r} (one per block_out_channels entry)")
        common = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                      groups=norm_num_groups, act_fn=act_fn, mid_block_add_attention=mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, **common)
        self.decoder = Decoder(latent_channels, out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self._init_tiling(sample_size, len(block_out_channels))

    # -- memory: tiles of an image, slices of a batch (diffusers' attributes and defaults) ------
    def _init_tiling(self, sample_size, blocks: int) -> None:
        self.use_slicing = self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = size
        self.tile_latent_min_size = int(size / (2 ** (blocks - 1)))
        self.tile_overlap_factor = 0.25

    def enable_tiling(self) -> None:
        """Encode and decode images larger than ``tile_sample_min_size`` pixels (the config's
        sample_size; set it lower, with ``tile_latent_min_size`` = it / 8, for smaller tiles)
        a tile at a time, as diffusers does."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return tiled(self._encode_tile, x, self.tile_sample_min_size,
                         self.tile_latent_min_size, self.tile_overlap_factor)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return tiled(self._decode_tile, z, self.tile_latent_min_size,
                         self.tile_sample_min_size, self.tile_overlap_factor)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images [B, C, H, W] in [-1, 1] -> ``.latent_dist`` (a DiagonalGaussianDistribution)."""
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(one) for one in x.split(1)])
        else:
            h = self._encode(x)
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents [B, latent_channels, h, w] -> ``.sample`` images [B, C, 8h, 8w] (for 4 blocks)."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(one) for one in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """Encode then decode (posterior sample or mode)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
