"""The budget bench's pipeline: FLUX.1-dev's shape (T5-XXL, CLIP-L, the transformer, the VAE)
with random weights, written once, tensor by tensor, into the bench cache.

Each component is built on the meta device from its config and its state dict written as a
bf16 safetensors file by bench.model.write_streaming_safetensors (header from the shapes, then
one drawn tensor at a time), so writing the 34 GB pipeline needs ~one tensor of memory. Weights
follow nn.Linear's / nn.Conv2d's default init (uniform, bound 1/sqrt(fan_in)), embeddings
U(-1, 1), norm weights 1 and their biases 0. The tokenizers and scheduler are the shipped
pipeline's (token ids fit every vocabulary).

    "full":    FLUX.1-dev: T5-XXL 4.76B, CLIP-L 0.12B, transformer 11.9B (19 + 38 blocks), VAE 84M
    "reduced": the same widths with T5 2 of 24 layers and the transformer 1 + 2 blocks (0.6B)
    "small":   CLIP-L and the VAE as they are; T5 width 1024, 6 layers (0.11B); the transformer
               width 1536, 2 + 4 blocks (0.31B)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from bench.model import write_streaming_safetensors

CACHE = Path(os.environ.get("DIFFQUANT_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
VERSION = 1

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
              tie_word_embeddings=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu", bos_token_id=100, eos_token_id=101, pad_token_id=101)
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19,
                num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=1024,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
SCALES = {
    "full": {},
    "reduced": {"t5": dict(num_layers=2), "flux": dict(num_layers=1, num_single_layers=2)},
    "small": {"t5": dict(num_layers=6, d_model=1024, d_ff=2816, num_heads=16),
              "flux": dict(num_layers=2, num_single_layers=4, num_attention_heads=12,
                           joint_attention_dim=1024)},
}


def pipeline_dir(scale: str) -> Path:
    return CACHE / f"budget-{scale}-v{VERSION}"


def _tensor_plan(model: torch.nn.Module) -> list[tuple[str, tuple, int]]:
    """(name, shape, fan_in; 0: ones, -1: zeros, -2: embedding) per tensor, tied ones once."""
    owners = dict(model.named_modules())
    plan, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner, _, leaf = name.rpartition(".")
        mod = owners.get(owner)
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = math.prod(mod.weight.shape[1:])
        elif isinstance(mod, torch.nn.Embedding) or "relative_attention_bias" in name \
                or "embedding" in name:
            fan_in = 1
        else:
            fan_in = 0 if leaf == "weight" else -1
        plan.append((name, tuple(tensor.shape), fan_in))
    return plan


def _write(model, folder: Path, weights: str, config: dict | None = None, hf_config=None) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hf_config is not None:
        hf_config.save_pretrained(tmp)
    else:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_streaming_safetensors(tmp / weights, _zeros_as_negative(_tensor_plan(model)))
    os.replace(tmp, folder)


def _zeros_as_negative(plan):
    # bench.model._draw draws U(+-1/sqrt(fan_in)) for fan_in > 0 and ones for 0; norm biases
    # (-1) are written as tiny values through fan_in = 10**12 (bound 1e-6), close enough to 0.
    return [(n, s, 10**12 if f == -1 else f) for n, s, f in plan]


def reuse_scale_transformer(folder: Path, log=print, source: Path | None = None) -> bool:
    """Build the full scale's transformer from bench.scale's FLUX.1-dev-shaped checkpoint
    (bench.model, ``dev`` size) instead of writing a second 23.8 GB copy: its weights file is
    hard-linked as shard 1 and the tensors it lacks (the guidance embedder: bench.model writes
    ``guidance_embeds=False``, FLUX.1-dev has it) are drawn into a small shard 2, with diffusers'
    index naming each key's shard. False (nothing written) where that checkpoint is absent,
    on another file system, or differs from FLUX_DEV in any other tensor or setting."""
    from bench.model import SIZES, WEIGHTS, checkpoint_dir
    from diffquant import FluxTransformer2DModel
    from diffquant.budget.memory import tensor_table_of

    source = Path(source) if source else checkpoint_dir(SIZES["dev"], CACHE)
    if not (source / WEIGHTS).is_file() or not (source / "config.json").is_file():
        return False
    theirs = {k: v for k, v in json.loads((source / "config.json").read_text()).items()
              if not k.startswith("_")}
    if {**theirs, "guidance_embeds": True} != {**FLUX_DEV, "guidance_embeds": True}:
        return False
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    plan = _zeros_as_negative(_tensor_plan(model))
    have = tensor_table_of(source / WEIGHTS)
    if set(have) - {n for n, _, _ in plan} \
            or any(n in have and have[n] != ("BF16", tuple(s)) for n, s, _ in plan):
        return False
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    first, second = ("diffusion_pytorch_model-0000%d-of-00002.safetensors" % i for i in (1, 2))
    try:
        os.link(source / WEIGHTS, tmp / first)
    except OSError:  # another file system: write the pipeline's own copy
        shutil.rmtree(tmp)
        return False
    log(f"transformer: {source / WEIGHTS} hard-linked; drawing the tensors it lacks")
    rest = [p for p in plan if p[0] not in have]
    write_streaming_safetensors(tmp / second, rest, seed=1)
    weight_map = {n: first for n in have} | {n: second for n, _, _ in rest}
    total = sum(math.prod(s) * 2 for _, s, _ in plan)
    (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(
        {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", **FLUX_DEV},
        indent=2) + "\n")
    os.replace(tmp, folder)
    return True


def ensure_pipeline(scale: str, log=print) -> Path:
    """The cached pipeline folder of ``scale``, written on first use, component by component."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffquant import AutoencoderKL, FluxTransformer2DModel, default_pipeline_path

    root, over = pipeline_dir(scale), SCALES[scale]
    root.mkdir(parents=True, exist_ok=True)
    default = default_pipeline_path()
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        if not (root / name).is_dir():
            shutil.copytree(default / name, root / name)
    jobs = {
        "text_encoder_2": lambda: (T5EncoderModel, T5Config(**{**T5_XXL, **over.get("t5", {})}),
                                   "model.safetensors"),
        "text_encoder": lambda: (CLIPTextModel, CLIPTextConfig(**CLIP_L), "model.safetensors"),
        "transformer": lambda: (FluxTransformer2DModel, {**FLUX_DEV, **over.get("flux", {})},
                                "diffusion_pytorch_model.safetensors"),
        "vae": lambda: (AutoencoderKL, FLUX_VAE, "diffusion_pytorch_model.safetensors"),
    }
    if scale == "full" and not (root / "transformer").is_dir():
        reuse_scale_transformer(root / "transformer", log)
    for name, job in jobs.items():
        if (root / name).is_dir():
            continue
        cls, config, weights = job()
        with torch.device("meta"):
            model = cls(config) if not isinstance(config, dict) else cls(**config)
        params = sum(p.numel() for p in model.parameters())
        log(f"writing {name} ({params / 1e9:.2f}B parameters, bf16) into {root / name} ...")
        if isinstance(config, dict):
            _write(model, root / name, weights, {"_class_name": cls.__name__,
                                                 "_diffusers_version": "0.42.1", **config})
        else:
            config.architectures = [cls.__name__]
            config.dtype = "bfloat16"
            _write(model, root / name, weights, hf_config=config)
    shutil.copy(default / "model_index.json", root / "model_index.json")
    return root
