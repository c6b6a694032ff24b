"""The bench's checkpoint: a Flux-configuration transformer with random weights, and its inputs.

The checkpoint is written once into ``bench/.cache/<size>/transformer`` in diffusers' layout
(config.json + diffusion_pytorch_model.safetensors), one tensor at a time: the safetensors
header is computed from the shapes of a model built on the meta device, then each tensor is
drawn, cast to bf16 and appended, so writing the 2.3 GB full checkpoint needs ~one tensor of
memory. Weights follow nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), so activations
stay in a sane range through the blocks.

Example:
    >>> from bench.model import SIZES, ensure_checkpoint                    # doctest: +SKIP
    >>> path = ensure_checkpoint(SIZES["smoke"])                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

# DIFFQUANT_BENCH_CACHE: another place for the checkpoints (the dev size's takes 24 GB)
CACHE = Path(os.environ.get("DIFFQUANT_BENCH_CACHE") or Path(__file__).resolve().parent / ".cache")
WEIGHTS = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1  # bump to invalidate cached checkpoints when the init changes


@dataclass(frozen=True)
class Size:
    """One bench configuration: model shape, token counts, timing repeats."""

    name: str
    heads: int                      # width = heads * 128, as Flux (24 heads -> 3072)
    double: int                     # double-stream blocks (Flux.1 has 19)
    single: int                     # single-stream blocks (Flux.1 has 38)
    image_tokens: tuple = (256, 1024)
    text_tokens: int = 256
    repeats: int = 2                # timed forwards per token count (the minimum is reported)
    warmup: bool = True             # one untimed forward first (first-call allocations)
    head_dim: int = 128
    config: dict = field(default_factory=dict)

    @property
    def transformer_config(self) -> dict:
        rope = (16, 56, 56) if self.head_dim == 128 else _rope_axes(self.head_dim)
        base = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=self.double,
                    num_single_layers=self.single, attention_head_dim=self.head_dim,
                    num_attention_heads=self.heads, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=rope)
        return {**base, **self.config}

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def _rope_axes(head_dim: int) -> tuple:
    third = (head_dim // 3) // 2 * 2
    return (head_dim - 2 * third, third, third)


SIZES = {
    # Flux width 3072, 2 double + 3 single blocks: 1.16B parameters, 2.3 GB in bf16.
    "full": Size("full", heads=24, double=2, single=3, image_tokens=(256, 1024), text_tokens=256,
                 repeats=2),
    # FLUX.1-dev's shape: 19 double + 38 single blocks, width 3072: 11.9B parameters, 23.8 GB
    # in bf16 (python -m bench --size dev; make bench-scale).
    "dev": Size("dev", heads=24, double=19, single=38, image_tokens=(256, 1024), text_tokens=64,
                repeats=1),
    # Width 1024, 1 + 1 blocks: 61M parameters, so ~45 child processes fit in minutes.
    "quick": Size("quick", heads=8, double=1, single=1, image_tokens=(64, 256), text_tokens=64,
                  repeats=1),
    # A toy for the smoke test: exercises every code path in seconds.
    "smoke": Size("smoke", heads=2, double=1, single=1, image_tokens=(16,), text_tokens=8,
                  repeats=1, warmup=False, head_dim=32, config=dict(joint_attention_dim=64,
                                                      pooled_projection_dim=32, in_channels=32)),
}


def checkpoint_dir(size: Size, cache: Path = CACHE) -> Path:
    return cache / f"{size.name}-v{FORMAT_VERSION}" / "transformer"


def _meta_model(size: Size):
    from diffquant import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**size.transformer_config)


def _plan(model) -> list[tuple[str, tuple, int]]:
    """(name, shape, fan_in or 0 for norm weights) for every tensor of the state dict."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plan = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        fan_in = model.get_submodule(owner).in_features if owner in linears else 0
        plan.append((name, tuple(tensor.shape), fan_in))
    return plan


def _draw(shape: tuple, fan_in: int, seed: int) -> torch.Tensor:
    """nn.Linear's default init (weights and biases ~ U(-1/sqrt(fan_in), +)); norm weights 1."""
    if not fan_in:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * (2 * bound) - bound).to(torch.bfloat16)


def write_streaming_safetensors(path: Path, plan, seed: int = 0) -> None:
    """Write a bf16 safetensors file tensor by tensor (header first, from the shapes alone)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in plan:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data to start 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for i, (name, shape, fan_in) in enumerate(plan):
            tensor = _draw(shape, fan_in, seed * 100003 + i)
            fh.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def ensure_checkpoint(size: Size, cache: Path = CACHE, log=print) -> Path:
    """The cached bf16 checkpoint directory of ``size``; written on first use (atomically)."""
    target = checkpoint_dir(size, cache)
    if (target / WEIGHTS).is_file() and (target / "config.json").is_file():
        return target
    import diffquant

    target.mkdir(parents=True, exist_ok=True)
    model = _meta_model(size)
    plan = _plan(model)
    params = sum(math.prod(s) for _, s, _ in plan)
    log(f"writing the {size.name} checkpoint ({params / 1e9:.2f}B parameters, "
        f"{params * 2 / 2**30:.2f} GiB bf16) to {target} ...")
    tmp = target / (WEIGHTS + ".tmp")
    write_streaming_safetensors(tmp, plan)
    config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1",
              "_diffquant_version": diffquant.__version__, **size.transformer_config}
    config["axes_dims_rope"] = list(config["axes_dims_rope"])
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, target / WEIGHTS)
    return target


def warm_page_cache(directory: Path) -> None:
    """Read every file once so timed loads measure the loader, not the disk."""
    for path in sorted(Path(directory).glob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def make_inputs(size: Size, image_tokens: int, seed: int = 0) -> dict:
    """Deterministic float32 forward() arguments for ``image_tokens`` image tokens, batch 1."""
    cfg = size.transformer_config
    gen = torch.Generator().manual_seed(seed + image_tokens)
    side = int(math.isqrt(image_tokens))
    rows = torch.arange(image_tokens) // max(side, 1)
    cols = torch.arange(image_tokens) % max(side, 1)
    img_ids = torch.stack([torch.zeros(image_tokens), rows.float(), cols.float()], dim=1)  # [S, 3]
    return dict(
        hidden_states=torch.randn(1, image_tokens, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(1, size.text_tokens, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(size.text_tokens, 3),
    )


def parameter_count(directory: Path) -> int:
    """Parameters in the checkpoint (read from the safetensors header only)."""
    with open(Path(directory) / WEIGHTS, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
