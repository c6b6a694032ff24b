"""ChromaTransformer2DModel: Flux.1 with its modulation pruned, numerically equal to diffusers 0.42.1.

Chroma keeps Flux's blocks, attention and RoPE but drops the per-block modulation layers and the
CLIP pooled input: one "distilled guidance" approximator (an MLP over a timestep embedding and a
fixed embedding of each modulation's index) computes every shift, scale and gate of every block
at once, ``[B, 3 * single + 12 * double + 2, dim]``. Text is T5 only, and padded T5 tokens can be
masked in attention. Blocks and attention are transformer_flux's own (the math is the same), with
weightless norms that take their chunks from that tensor, so state-dict keys are diffusers'.

Example:
    >>> import torch
    >>> from diffquant import ChromaTransformer2DModel
    >>> m = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16,
    ...     num_attention_heads=2, joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6),
    ...     approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
    >>> out = m(torch.randn(1, 4, 16), torch.randn(1, 3, 32), torch.tensor([0.5]),
    ...         torch.zeros(4, 3), torch.zeros(3, 3)).sample
    >>> tuple(out.shape)
    (1, 4, 16)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..configuration import ConfigMixin, register_to_config
from ..lora.model import LoraModelMixin, apply_lora_scale
from ..modeling import ModelMixin
from .transformer_flux import (FluxSingleTransformerBlock, FluxTransformerBlock, MLPEmbedder,
                               Transformer2DModelOutput, joint_rope, modulate, timestep_embedding)


@functools.lru_cache(maxsize=8)
def _index_embedding(count: int, dim: int) -> torch.Tensor:
    """[count, dim] float32 sinusoids of 0, 1000, 2000, ...: which modulation a row computes.

    diffusers holds it as a non-persistent buffer built on the CPU at init; here it is built
    on the CPU once (the same float32 values) and moved where it is used, so nothing on the
    meta device needs filling and no checkpoint carries it."""
    return timestep_embedding(torch.arange(count) * 1000, dim)


class PrunedAdaLayerNormZero(nn.Module):
    """LayerNorm modulated by ``chunks`` precomputed rows of emb [B, chunks, dim]; no weights."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, *rest = emb.flatten(1, 2).chunk(self.chunks, dim=1)     # each [B, dim]
        return (modulate(self.norm(x), shift, scale), *rest)


class ChromaApproximator(nn.Module):
    """in_proj -> n x (x + MLP(RMSNorm(x))) -> out_proj, applied to every modulation row."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int = 5):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class ChromaTransformer2DModel(LoraModelMixin, ModelMixin, ConfigMixin):
    """The Chroma transformer; config arguments and state-dict keys are diffusers'.

    Example:
        >>> from diffquant import ChromaTransformer2DModel
        >>> m = ChromaTransformer2DModel.from_pretrained("chroma_dir", subfolder="transformer")  # doctest: +SKIP
    """

    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    # diffusers' Chroma keeps no module in float32 and its quantizers convert every nn.Linear
    # (the approximator's too); its _skip_layerwise_casting_patterns ("pos_embed", "norm") name
    # modules without weights here, and diffquant has no layerwise casting.
    _keep_in_fp32_modules: list[str] = []

    @register_to_config
    def __init__(self, patch_size: int = 1, in_channels: int = 64, out_channels: int | None = None,
                 num_layers: int = 19, num_single_layers: int = 38, attention_head_dim: int = 128,
                 num_attention_heads: int = 24, joint_attention_dim: int = 4096,
                 axes_dims_rope: tuple[int, ...] = (16, 56, 56), approximator_num_channels: int = 64,
                 approximator_hidden_dim: int = 5120, approximator_layers: int = 5):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope={list(axes_dims_rope)} sums to {sum(axes_dims_rope)}, but "
                             f"attention_head_dim is {attention_head_dim}; they must be equal")
        if approximator_num_channels % 4:
            raise ValueError(f"approximator_num_channels={approximator_num_channels}: must be a "
                             "multiple of 4 (a quarter each for timestep and guidance, half for the index)")
        self.out_channels = out_channels or in_channels
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope = tuple(axes_dims_rope)
        self.num_modulations = 3 * num_single_layers + 2 * 6 * num_layers + 2
        self.distilled_guidance_layer = ChromaApproximator(
            approximator_num_channels, dim, approximator_hidden_dim, approximator_layers)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, num_attention_heads, attention_head_dim,
                                 norm_cls=PrunedAdaLayerNormZero) for _ in range(num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim,
                                       norm_cls=PrunedAdaLayerNormZero)
            for _ in range(num_single_layers))
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)  # modulated by the last 2 rows
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def modulations(self, timestep: torch.Tensor) -> torch.Tensor:
        """Every block's shift/scale/gate rows: timestep [B] (x1000) -> [B, num_modulations, dim].

        The approximator's input per row: the timestep's and a zero guidance's sinusoids
        (a quarter of its channels each), then the row index's (half)."""
        channels = self.config.approximator_num_channels // 4
        batch, count = timestep.shape[0], self.num_modulations
        t_proj = timestep_embedding(timestep, channels).to(timestep.dtype)          # [B, c]
        g_proj = timestep_embedding(torch.zeros(batch, dtype=torch.long), channels)
        g_proj = g_proj.to(dtype=timestep.dtype, device=timestep.device)           # [B, c]
        index = _index_embedding(count, 2 * channels).to(t_proj.device, t_proj.dtype)
        tg = torch.cat([t_proj, g_proj], dim=1).unsqueeze(1).repeat(1, count, 1)    # [B, L, 2c]
        x = torch.cat([tg, index.repeat(batch, 1, 1)], dim=-1).to(timestep.dtype)   # [B, L, 4c]
        return self.distilled_guidance_layer(x)

    @apply_lora_scale("joint_attention_kwargs")  # its "scale" scales the LoRAs for the call
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                timestep: torch.Tensor = None, img_ids: torch.Tensor = None,
                txt_ids: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                joint_attention_kwargs: dict | None = None, return_dict: bool = True):
        """Denoise packed latents.

        hidden_states [B, S, in_channels], encoder_hidden_states [B, T, joint_attention_dim],
        timestep [B] in [0, 1], img_ids [S, 3], txt_ids [T, 3], attention_mask [B, T+S] or None
        (its outer product reaches SDPA: bool keeps True, float is added, as in diffusers).
        Returns ``.sample`` [B, S, p*p*out_channels].
        """
        hidden_states = self.x_embedder(hidden_states)                           # [B, S, dim]
        mods = self.modulations(timestep.to(hidden_states.dtype) * 1000)         # [B, L, dim]
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)     # [B, T, dim]
        rope = joint_rope(txt_ids, img_ids, self.axes_dims_rope)
        if attention_mask is not None:  # [B, T+S] -> [B, 1, T+S, T+S]
            attention_mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]

        # rows: 3 per single block, then 6 per double block for the image stream, 6 for text
        img_offset = 3 * len(self.single_transformer_blocks)
        txt_offset = img_offset + 6 * len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            img, txt = img_offset + 6 * i, txt_offset + 6 * i
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, mods[:, img:img + 6], rope, attention_mask,
                context_temb=mods[:, txt:txt + 6])
        for i, block in enumerate(self.single_transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, mods[:, 3 * i:3 * i + 3], rope, attention_mask)

        shift, scale = mods[:, -2:].flatten(1, 2).to(hidden_states.dtype).chunk(2, dim=1)
        output = self.proj_out(modulate(self.norm_out(hidden_states), shift, scale))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
