"""LoRA files on disk: a path, a folder, a hub id or a state dict in; one safetensors file out.

Reading goes through diffquant's validated safetensors reader (``checkpoint.Checkpoint``:
``.bin`` files with ``weights_only=True``), so a bad file is an error naming it and nothing in it
runs. A folder or hub repository without ``weight_name`` gives diffusers' default name
``pytorch_lora_weights.safetensors``, or its only ``.safetensors`` file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, write_safetensors
from ..errors import CheckpointError
from ..hub import resolve_dir, split_hub_kwargs

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"


def read_lora(source, weight_name: str | None = None, subfolder: str | None = None,
              **kwargs) -> tuple[dict, dict, str]:
    """(state dict, safetensors metadata, a name for messages) of a LoRA ``source``.

    Example:
        >>> sd, meta, where = read_lora("my_lora.safetensors")     # doctest: +SKIP
    """
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"LoRA state dict: {bad[0]!r} is a {type(source[bad[0]]).__name__}, "
                                  "not a tensor")
        return dict(source), {}, "LoRA state dict"
    hub_kwargs = split_hub_kwargs(kwargs)
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        patterns = [weight_name] if weight_name else ["*.safetensors"]
        if subfolder:
            patterns = [f"{subfolder}/{p}" for p in patterns]
        folder = resolve_dir(source, subfolder=subfolder, allow_patterns=patterns, **hub_kwargs)
        path = folder / weight_name if weight_name else _guess_file(folder)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    with Checkpoint.open(path) as ckpt:
        return {k: ckpt.tensor(k) for k in ckpt.keys()}, dict(ckpt.metadata), str(path)


def _guess_file(folder: Path) -> Path:
    default = folder / LORA_WEIGHT_NAME_SAFE
    if default.is_file():
        return default
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(f"{folder}: no {LORA_WEIGHT_NAME_SAFE} and {len(found)} other "
                              f".safetensors files ({names}); pass weight_name=")
    return found[0]


def write_lora(save_directory, tensors: dict[str, torch.Tensor], weight_name: str | None = None,
               metadata: dict | None = None) -> Path:
    """Write ``tensors`` into ``save_directory/weight_name`` (created if needed) whole or not at
    all: into a sibling temporary file, renamed into place."""
    directory = Path(os.fspath(save_directory))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (weight_name or LORA_WEIGHT_NAME_SAFE)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: diffquant writes LoRA weights only as .safetensors")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_safetensors(tensors, tmp, {k: v if isinstance(v, str) else json.dumps(v)
                                         for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
