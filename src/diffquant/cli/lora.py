"""``--lora FILE[:SCALE]`` of ``generate`` and ``compare``: LoRA adapters on the loaded pipeline.

Each flag loads one adapter (named ``lora0``, ``lora1`` ...); all run together, each at its
scale (default 1.0), through the pipeline's ``load_lora_weights`` and ``set_adapters``.
"""

from __future__ import annotations

from pathlib import Path

from .commands import UsageError

HELP = ("a LoRA file (.safetensors: diffusers/PEFT, kohya, XLabs or BFL key names) and its "
        "strength, default 1.0 (repeatable: the adapters run together)")


def parse_lora(text: str) -> tuple[str, float]:
    """``'style.safetensors:0.8'`` -> ('style.safetensors', 0.8); a path may hold ':' itself.

    Example:
        >>> parse_lora("loras/style.safetensors:0.8")
        ('loras/style.safetensors', 0.8)
        >>> parse_lora("style.safetensors")
        ('style.safetensors', 1.0)
    """
    path, colon, scale = text.rpartition(":")
    if colon:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def check_loras(specs: list[str] | None) -> list[tuple[str, float]]:
    """(file, scale) of each ``--lora``; a missing file is a usage error (before any loading)."""
    out = []
    for spec in specs or ():
        path, scale = parse_lora(spec)
        if not Path(path).is_file():
            raise UsageError(f"--lora {spec!r}: no such file {path!r} (write FILE or FILE:SCALE)")
        out.append((path, scale))
    return out


def apply_loras(pipe, specs: list[str] | None) -> None:
    """Load every ``--lora`` into ``pipe`` and run them together at their scales."""
    if not specs:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise UsageError(f"--lora: {type(pipe).__name__} has no LoRA support; use a Flux, "
                         "Flux Kontext or Chroma pipeline")
    names, scales = [], []
    for i, (path, scale) in enumerate(check_loras(specs)):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
