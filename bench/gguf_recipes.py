"""GGUF recipes: bits per weight and quality of each community recipe against the bf16 model.

    python -m bench.gguf_recipes                 # the quick checkpoint (width 1024, 61M params)
    python -m bench.gguf_recipes --size full     # Flux width 3072, 1.16B params (long)
    python -m bench.gguf_recipes --only Q4_K_M Q8_0

For each recipe the bench's bf16 checkpoint (bench/model.py) is exported with
``diffquant.gguf_export.export_gguf`` in the community layout, then loaded back with
``from_single_file`` (GGUF layers, float32 compute) and compared with the bf16 model run in
float32:

- bits/weight: the file's bytes x 8 / the model's parameters (embedders and final layer in
  BF16, 1-D tensors F32, as the recipe writes them), and over the quantized weights alone;
- weight error: RMS of (dequantized - bf16) / RMS of bf16, over every 2-D weight;
- output error: ||out - out_bf16|| / ||out_bf16|| of one forward at 256 image tokens.

Random weights (nn.Linear's init) are harder to quantize than trained ones (no outliers to
exploit, no redundancy), so errors here are upper-ish bounds; the ranking of recipes holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
           "Q4_1", "Q4_0"]


def measure(model, config_dir: Path, recipe: str, inputs: dict, expected: torch.Tensor,
            tmp: Path) -> list:
    import gguf
    import numpy as np

    from diffquant import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffquant.gguf_export import export_gguf

    start = time.perf_counter()
    path = export_gguf(model, tmp / f"{recipe}.gguf", recipe=recipe)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    quantized_bytes = quantized_params = 0
    num = den = 0.0
    from diffquant.gguf_export import community_sources, model_sources

    fused, _ = community_sources(model_sources(model))
    for tensor in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        if values.ndim == 2:
            want = fused[tensor.name].value.float().numpy()
            num += float(((values - want) ** 2).sum())
            den += float((want ** 2).sum())
        if tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            quantized_bytes += int(tensor.n_bytes)
            quantized_params += int(tensor.n_elements)
    loaded = FluxTransformer2DModel.from_single_file(
        path, config=config_dir, quantization_config=GGUFQuantizationConfig(torch.float32))
    with torch.no_grad():
        out = loaded(**inputs).sample
    error = ((out - expected).norm() / expected.norm()).item()
    q_bpw = f"{quantized_bytes * 8 / quantized_params:.2f}" if quantized_params else "-"
    return [recipe, f"{path.stat().st_size * 8 / params:.2f}", q_bpw, f"{(num / den) ** 0.5:.4f}",
            f"{error:.4f}", f"{path.stat().st_size / 2**20:.1f}", f"{seconds:.1f}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="quick", choices=["quick", "full"])
    parser.add_argument("--only", nargs="*", default=None, help="recipes to run")
    args = parser.parse_args(argv)
    from bench.model import SIZES, ensure_checkpoint, make_inputs
    from bench.tables import machine_line, md_table
    from diffquant import FluxTransformer2DModel

    size = SIZES[args.size]
    config_dir = ensure_checkpoint(size, log=lambda m: print(m, file=sys.stderr))
    model = FluxTransformer2DModel.from_pretrained(config_dir, torch_dtype=torch.float32)  # bf16 values
    inputs = make_inputs(size, 256)
    with torch.no_grad():
        expected = model(**inputs).sample
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffquant-recipes-") as tmp:
        for recipe in args.only or RECIPES:
            print(f"{recipe} ...", file=sys.stderr, flush=True)
            rows.append(measure(model, config_dir, recipe, inputs, expected, Path(tmp)))
    print(machine_line(torch.get_num_threads()))
    print()
    print(md_table(["recipe", "bits/weight (file)", "bits/weight (quantized)", "weight error",
                    "output error", "MiB", "export s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
