"""A tiny ModelMixin model whose weights are dominated by nn.Linear layers, for backend tests.

Backends swap nn.Linear by name, so this exercises the whole quantizer lifecycle without the
Flux models: ``save_toy(tmp_path)`` writes a bf16 checkpoint and returns its directory.
"""

import torch
from torch import nn

from diffquant.configuration import ConfigMixin, register_to_config
from diffquant.modeling import ModelMixin


def _build_layers(model: nn.Module, width: int, hidden: int, depth: int) -> None:
    """The toy's layers; ToyModel and its diffusers twin build the same names and shapes."""
    model.proj_in = nn.Linear(width, hidden)
    model.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
    model.norm = nn.LayerNorm(hidden)
    model.proj_out = nn.Linear(hidden, width, bias=False)


class ToyModel(ModelMixin, ConfigMixin):
    _keep_in_fp32_modules = []

    @register_to_config
    def __init__(self, width: int = 128, hidden: int = 256, depth: int = 2):
        super().__init__()
        _build_layers(self, width, hidden, depth)

    def forward(self, x):
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + torch.nn.functional.gelu(block(h))
        return self.proj_out(self.norm(h))


def save_toy(directory, dtype=torch.bfloat16, seed=0, **config):
    """Save a randomly initialised ToyModel in ``dtype`` to ``directory``; returns the model."""
    torch.manual_seed(seed)
    model = ToyModel(**config).to(dtype)
    model.save_pretrained(directory)
    return model


def toy_input(width=128, rows=4, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g).to(dtype)


def assert_missing_piece_is_named(source, config, piece, tmp_path):
    """Quantize ``source`` with ``config``, save, delete stored tensor ``piece``: reload names it."""
    import pytest
    from safetensors.torch import load_file, save_file

    from diffquant.errors import CheckpointError

    ToyModel.from_pretrained(source, quantization_config=config,
                             torch_dtype=torch.bfloat16).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    del tensors[piece]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"missing {piece}; "):
        ToyModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)


def _diffusers_toy_class():
    import diffusers
    from diffusers.configuration_utils import register_to_config as d_register_to_config

    class DiffusersToyModel(diffusers.ModelMixin, diffusers.ConfigMixin):
        """ToyModel written against diffusers (same names, same math), to load the same checkpoints."""

        config_name = "config.json"

        @d_register_to_config
        def __init__(self, width: int = 128, hidden: int = 256, depth: int = 2):
            super().__init__()
            _build_layers(self, width, hidden, depth)

        forward = ToyModel.forward

    return DiffusersToyModel


def __getattr__(name):
    # diffusers is imported only by the tests that compare against it
    if name == "DiffusersToyModel":
        globals()[name] = cls = _diffusers_toy_class()
        return cls
    raise AttributeError(name)


def gguf_reference(ref: nn.Module, x: torch.Tensor, qtype, compute_dtype) -> torch.Tensor:
    """The toy's forward with each linear weight dequantize(quantize(w)) in GGUF ``qtype``;
    rows that do not fill whole blocks stay in the compute dtype, as the backend keeps them."""
    import torch.nn.functional as F

    from diffquant.ops.formats.gguf import BLOCK_LAYOUT, dequantize, ggml_type, quantize

    block = BLOCK_LAYOUT[ggml_type(qtype)][0]

    def lin(layer, h):
        w = layer.weight.to(compute_dtype) if layer.weight.shape[-1] % block else \
            dequantize(quantize(layer.weight, qtype), qtype, compute_dtype)
        b = layer.bias.to(compute_dtype) if layer.bias is not None else None
        return F.linear(h.to(compute_dtype), w, b).to(h.dtype)

    h = lin(ref.proj_in, x)
    for block_layer in ref.blocks:
        h = h + torch.nn.functional.gelu(lin(block_layer, h))
    return lin(ref.proj_out, ref.norm(h))


def flux_inputs(channels: int = 32, text_dim: int = 32) -> dict:
    """Inputs for a tiny Flux transformer: batch 2, 6 image tokens (2 x 3), 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack([torch.zeros(6), torch.arange(6.0) // 3, torch.arange(6.0) % 3], -1)
    return dict(hidden_states=torch.randn(2, 6, channels, generator=g),
                encoder_hidden_states=torch.randn(2, 5, text_dim, generator=g),
                pooled_projections=torch.randn(2, text_dim, generator=g),
                timestep=torch.tensor([0.3, 0.7]), img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                guidance=torch.tensor([3.5, 2.0]))
