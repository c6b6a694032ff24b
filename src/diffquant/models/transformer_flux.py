"""FluxTransformer2DModel: the Flux.1 MMDiT, numerically equal to diffusers 0.42.1.

One file (diffusers' single-file policy), no attention-processor machinery: attention is
``F.scaled_dot_product_attention``. Module and parameter names equal diffusers' so checkpoints
load both ways, and every projection is a plain ``nn.Linear`` so quantizers can swap it by name.

Example:
    >>> import torch
    >>> from diffquant import FluxTransformer2DModel
    >>> m = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16,
    ...     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    ...     in_channels=16, axes_dims_rope=(4, 6, 6))
    >>> img_ids, txt_ids = torch.zeros(4, 3), torch.zeros(3, 3)
    >>> out = m(torch.randn(1, 4, 16), torch.randn(1, 3, 32), torch.randn(1, 32),
    ...         torch.tensor([0.5]), img_ids, txt_ids).sample
    >>> tuple(out.shape)
    (1, 4, 16)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import ConfigMixin, register_to_config
from ..lora.model import LoraModelMixin, apply_lora_scale
from ..modeling import ModelMixin
from ..outputs import BaseOutput

logger = logging.getLogger(__name__)


@dataclass
class Transformer2DModelOutput(BaseOutput):
    """``sample``: (batch, image_tokens, patch_size**2 * out_channels)."""

    sample: torch.Tensor


# -- positional and timestep embeddings ------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (diffusers' flip_sin_to_cos=True, shift 0): [N] -> [N, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)                          # [half]
    angles = t[:, None].float() * freqs[None, :]                # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dim, theta: float = 10000.0):
    """Flux's 3-axis RoPE: ids [S, n_axes] -> (cos, sin), each [S, sum(axes_dim)] float32.

    Each axis i rotates ``axes_dim[i]`` channels by its own position; frequencies are computed
    in float64 where the device has it (as diffusers does), then rounded to float32.
    """
    pos = ids.float()
    freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu", "neuron") else torch.float64
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, i], inv)                    # [S, dim/2]
        cos_out.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_out.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [B, S, H, D] by rope (cos, sin), each [S, D]."""
    cos, sin = (r[None, :, None, :].to(x.device) for r in rope)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)          # [B, S, H, D/2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)       # [B, S, H, D]
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def joint_rope(txt_ids: torch.Tensor, img_ids: torch.Tensor, axes_dim):
    """RoPE (cos, sin) over text then image tokens; ids [T, 3] and [S, 3] (a batch dim is dropped)."""
    if txt_ids.ndim == 3:
        logger.warning("txt_ids with a batch dimension is deprecated; pass a 2d [T, 3] tensor")
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        logger.warning("img_ids with a batch dimension is deprecated; pass a 2d [S, 3] tensor")
        img_ids = img_ids[0]
    return rope_frequencies(torch.cat((txt_ids, img_ids), dim=0), axes_dim)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """Conditioning vector temb [B, dim] = MLP(timestep) (+ MLP(guidance)) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        if guidance_embeds:
            self.guidance_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, dim)

    def forward(self, timestep, guidance, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# -- norms, feed-forward, attention ----------------------------------------------------------
def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """normed [B, S, dim] scaled by (1 + scale) and shifted by shift, each [B, dim]."""
    return normed * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by temb; returns the normed input and the remaining modulation chunks.

    ``chunks`` is 6 for the double-stream blocks and 3 (AdaLayerNormZeroSingle) for single-stream.
    """

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, *rest = self.linear(self.silu(emb)).chunk(self.chunks, dim=1)   # each [B, dim]
        return (modulate(self.norm(x), shift, scale), *rest)


class AdaLayerNormContinuous(nn.Module):
    """Final norm: LayerNorm scaled and shifted by temb (note the scale-then-shift order)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, dim * 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(cond).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """net.0.proj -> tanh-GELU -> net.2, hidden width 4 * dim (diffusers' key names)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class FluxAttention(nn.Module):
    """Joint attention with per-head RMSNorm on q/k; the context stream has its own projections.

    ``joint``: add the context projections (double-stream). ``pre_only``: no output projection
    (single-stream, whose block projects attention and MLP together).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, pre_only: bool,
                 eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if joint:
            self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))             # [B, S, H*D] -> [B, S, H, D]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None,
                attention_mask: torch.Tensor | None = None):
        q, k = self.norm_q(self._heads(self.to_q(x))), self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:  # text tokens first, then image tokens
            cq = self.norm_added_q(self._heads(self.add_q_proj(context)))
            ck = self.norm_added_k(self._heads(self.add_k_proj(context)))
            cv = self._heads(self.add_v_proj(context))
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # attention_mask [B, 1, T+S, T+S] as SDPA reads it: bool keeps True, float is added
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)    # [B, S, H*D]
        if context is None:
            return out
        ctx_out, out = out.split_with_sizes([context.shape[1], out.shape[1] - context.shape[1]], dim=1)
        out = self.to_out[1](self.to_out[0](out.contiguous()))
        return out, self.to_add_out(ctx_out.contiguous())


# -- blocks ----------------------------------------------------------------------------------
def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text keep their own weights, attend jointly.

    ``norm_cls`` makes the modulation: AdaLayerNormZero projects temb itself (Flux); Chroma's
    weightless norm takes chunks computed outside the block, one temb per stream.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 norm_cls=AdaLayerNormZero):
        super().__init__()
        self.norm1 = norm_cls(dim)
        self.norm1_context = norm_cls(dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, joint=True, pre_only=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, hidden_states, encoder_hidden_states, temb, rope, attention_mask=None,
                context_temb=None):
        """``context_temb``: the text stream's modulation input where it differs from ``temb``."""
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        c_normed, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, temb if context_temb is None else context_temb)
        attn_out, ctx_attn_out = self.attn(normed, c_normed, rope, attention_mask)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        normed = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(normed)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * ctx_attn_out
        c_normed = modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(c_normed)
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text; image]: attention and MLP in parallel, one output proj."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 mlp_ratio: float = 4.0, norm_cls=AdaLayerNormZero):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = norm_cls(dim, chunks=3)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, joint=False, pre_only=True)

    def forward(self, hidden_states, encoder_hidden_states, temb, rope, attention_mask=None):
        text_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)   # [B, T+S, dim]
        normed, gate = self.norm(residual, temb)
        mlp = self.act_mlp(self.proj_mlp(normed))
        attn = self.attn(normed, rope=rope, attention_mask=attention_mask)
        out = residual + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2))
        out = _clip_fp16(out)
        return out[:, :text_len], out[:, text_len:]


# -- the model -------------------------------------------------------------------------------
class FluxTransformer2DModel(LoraModelMixin, ModelMixin, ConfigMixin):
    """The Flux transformer; config arguments and state-dict keys are diffusers'.

    Example:
        >>> from diffquant import FluxTransformer2DModel
        >>> m = FluxTransformer2DModel.from_pretrained("flux_dir", subfolder="transformer")  # doctest: +SKIP
    """

    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _keep_in_fp32_modules: list[str] = []

    @register_to_config
    def __init__(self, patch_size: int = 1, in_channels: int = 64, out_channels: int | None = None,
                 num_layers: int = 19, num_single_layers: int = 38, attention_head_dim: int = 128,
                 num_attention_heads: int = 24, joint_attention_dim: int = 4096,
                 pooled_projection_dim: int = 768, guidance_embeds: bool = False,
                 axes_dims_rope: tuple[int, int, int] = (16, 56, 56)):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope={list(axes_dims_rope)} sums to {sum(axes_dims_rope)}, but "
                             f"attention_head_dim is {attention_head_dim}; they must be equal")
        self.out_channels = out_channels or in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope = tuple(axes_dims_rope)
        self.time_text_embed = TimestepTextEmbedding(dim, pooled_projection_dim, guidance_embeds)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim)
            for _ in range(num_single_layers))
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def _temb(self, timestep, guidance, pooled_projections, dtype) -> torch.Tensor:
        has_guidance = self.config.guidance_embeds
        if has_guidance and guidance is None:
            raise ValueError("FluxTransformer2DModel: this model has guidance_embeds=True, so forward() "
                             "needs `guidance` (a [batch] tensor of guidance scales)")
        if not has_guidance and guidance is not None:
            raise ValueError("FluxTransformer2DModel: this model has guidance_embeds=False; pass "
                             "guidance=None")
        timestep = timestep.to(dtype) * 1000
        guidance = guidance.to(dtype) * 1000 if guidance is not None else None
        return self.time_text_embed(timestep, guidance, pooled_projections)

    @apply_lora_scale("joint_attention_kwargs")  # its "scale" scales the LoRAs for the call
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep: torch.Tensor = None,
                img_ids: torch.Tensor = None, txt_ids: torch.Tensor = None,
                guidance: torch.Tensor | None = None, joint_attention_kwargs: dict | None = None,
                return_dict: bool = True):
        """Denoise packed latents.

        hidden_states [B, S, in_channels], encoder_hidden_states [B, T, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], timestep [B] in [0, 1], img_ids [S, 3],
        txt_ids [T, 3], guidance [B] or None. Returns ``.sample`` [B, S, p*p*out_channels].
        """
        hidden_states = self.x_embedder(hidden_states)                      # [B, S, dim]
        temb = self._temb(timestep, guidance, pooled_projections, hidden_states.dtype)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # [B, T, dim]
        rope = joint_rope(txt_ids, img_ids, self.axes_dims_rope)

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rope)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, rope)

        output = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
