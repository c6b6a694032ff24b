"""What the command line prints and draws: tables, an image grid, PSNR, sizes, peak memory.

Example:
    >>> from diffquant.report import format_table, human_bytes
    >>> print(format_table(["name", "size"], [["transformer", human_bytes(3 * 2**20)]]))
    name         size
    -----------  -------
    transformer  3.0 MiB
"""

from __future__ import annotations

import math
import os
import resource
import sys
from pathlib import Path

import numpy as np


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table (left-aligned columns, a dashed rule under the header)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of two same-size 8-bit images (inf when identical)."""
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: images differ in shape {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def image_grid(images: list, labels: list[str], pad: int = 4, label_height: int = 14):
    """One row of ``images`` (PIL), each with its label written under it; returns a PIL image."""
    from PIL import Image, ImageDraw

    # Cells are wide enough for the label too (the default bitmap font is ~6 px a character),
    # so small images still get readable labels; each image is centred in its cell.
    width = max([im.width for im in images] + [6 * len(label) for label in labels])
    height = max(im.height for im in images)
    grid = Image.new("RGB", (len(images) * (width + pad) + pad, height + label_height + 2 * pad),
                     "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels)):
        x = pad + i * (width + pad)
        grid.paste(im.convert("RGB"), (x + (width - im.width) // 2, pad))
        draw.text((x + (width - 6 * len(label)) // 2, pad + height + 2), label, fill="black")
    return grid


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM from /proc, else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def logical_parameters(module) -> int:
    """Parameter count as the unquantized model has it (a packed quantized weight counts as
    in_features * out_features), so quantized and plain components compare."""
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(n_in, int) and isinstance(n_out, int) and \
            (hasattr(module, "weight") or "Quantized" in type(module).__name__):
        return n_in * n_out + (n_out if getattr(module, "bias", None) is not None else 0)
    own = sum(p.numel() for p in module.parameters(recurse=False))
    return own + sum(logical_parameters(child) for child in module.children())


def describe_quantization(component) -> str:
    """"torchao int8wo", "bitsandbytes nf4", ... or "-" for an unquantized component."""
    quantizer = getattr(component, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:  # a transformers model quantized by transformers, or none at all
        config = getattr(getattr(component, "config", None), "quantization_config", None)
    if config is None:
        return "-"
    if isinstance(config, dict):
        d = config
    else:
        d = config.to_dict() if hasattr(config, "to_dict") else {}
    method = getattr(config, "quant_method", None) or d.get("quant_method") or "?"
    method = str(getattr(method, "value", method))  # diffquant's and transformers' enums
    if quantizer is not None and hasattr(quantizer, "scheme_name"):
        scheme = quantizer.scheme_name()
    else:
        scheme = _scheme_from_dict(config, d)
    if not scheme or scheme == method or scheme.startswith(method + " "):
        return scheme or method  # some backends' scheme_name() already names the method
    return f"{method} {scheme}"


def _scheme_from_dict(config, d: dict) -> str:
    if d.get("load_in_4bit"):
        dq = "-dq" if d.get("bnb_4bit_use_double_quant") else ""
        return f"{d.get('bnb_4bit_quant_type', 'fp4')}{dq}"
    if d.get("load_in_8bit"):
        return "int8"
    quant_type = getattr(config, "quant_type", None) or d.get("quant_type")
    if quant_type is not None and not isinstance(quant_type, (str, dict)):
        return type(quant_type).__name__  # transformers' TorchAoConfig holds a torchao object
    if isinstance(quant_type, dict):
        return str(quant_type.get("default", {}).get("_type", "")) or "?"
    return str(quant_type or d.get("weights") or d.get("weights_dtype") or "")


def inspect_rows(pipe, model_index: dict, root) -> list[list]:
    """Rows of `diffquant inspect`: component, class, quantization, parameters, disk, memory."""
    import torch

    rows, totals = [], [0, 0, 0]
    components = pipe.components
    # [null, null] entries are optional components this pipeline does not have.
    names = [k for k, v in model_index.items() if not k.startswith("_") and
             not (isinstance(v, (list, tuple)) and v and v[0] is None)]
    for name in sorted(names):
        component = components.get(name)
        on_disk = dir_bytes(Path(root) / name) if (Path(root) / name).is_dir() else None
        cls = type(component).__name__ if component is not None else "None"
        if isinstance(component, torch.nn.Module):
            params = logical_parameters(component)
            memory = component.get_memory_footprint() if hasattr(component, "get_memory_footprint") \
                else sum(t.numel() * t.element_size() for t in component.state_dict().values())
            quant = describe_quantization(component)
        else:
            params = memory = None
            quant = "-"
        for i, value in enumerate((params, on_disk, memory)):
            totals[i] += value or 0
        rows.append([name, cls, quant, human_count(params), human_bytes(on_disk), human_bytes(memory)])
    rows.append(["total", "", "", human_count(totals[0]), human_bytes(totals[1]), human_bytes(totals[2])])
    return rows


def compare_table(labels: list[str], results: list[dict], images: list) -> str:
    """`diffquant compare`'s table; the first variant is the unquantized reference."""
    gpu = any(r.get("peak_gpu") for r in results)
    header = ["variant", "load s", "peak RSS"] + (["peak GPU"] if gpu else []) + \
        ["weights", "s/step", "PSNR dB"]
    rows = []
    for i, (label, r, im) in enumerate(zip(labels, results, images)):
        rows.append([label, f"{r['load_s']:.2f}", human_bytes(r["peak_rss"])] +
                    ([human_bytes(r.get("peak_gpu"))] if gpu else []) +
                    [human_bytes(r["weight_bytes"]), f"{r['s_per_step']:.3f}",
                     "ref" if i == 0 else f"{psnr(im, images[0]):.2f}"])
    return format_table(header, rows)


def weight_bytes(pipe) -> int:
    """Bytes held by the weights of the pipeline's models (quantized size where quantized)."""
    import torch

    return sum(m.get_memory_footprint() if hasattr(m, "get_memory_footprint") else
               sum(p.numel() * p.element_size() for p in m.parameters())
               for m in pipe.components.values() if isinstance(m, torch.nn.Module))


def peak_gpu_bytes() -> int | None:
    """Peak memory allocated by torch on the current CUDA device, None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
