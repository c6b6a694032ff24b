"""Render docs/samples.png: the shipped default pipeline on 8 prompts, each prompt under its image.

Runs diffquant's FluxPipeline at its default number of inference steps (28), 64x64, seed 0, and
upscales each image 3x (nearest) so the grid is readable.

Usage:
    .venv/bin/python scripts/make_samples.py [--pipeline DIR] [--out docs/samples.png]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle on a yellow background",
    "a yellow square left of a purple circle",
    "a white triangle below a black circle",
    "a blue circle on an orange background",
    "an orange triangle right of a green square",
    "a black square on a white background",
    "a purple circle above a red triangle on a yellow background",
]


def render(pipe, prompts, seed: int = 0):
    """prompts -> list of 64x64 PIL images, one generator per image so each is reproducible."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, height=64, width=64, max_sequence_length=16, generator=gens).images


def grid(images, prompts, cols: int = 4, scale: int = 3) -> Image.Image:
    side = 64 * scale
    font = ImageFont.load_default()
    text_h = 44
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (side + 8) + 8, rows * (side + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (img, prompt) in enumerate(zip(images, prompts)):
        x, y = 8 + (k % cols) * (side + 8), 8 + (k // cols) * (side + text_h + 8)
        canvas.paste(img.resize((side, side), Image.NEAREST), (x, y))
        for i, line in enumerate(textwrap.wrap(prompt, 30)[:3]):
            draw.text((x + 2, y + side + 3 + 13 * i), line, fill="black", font=font)
    return canvas


def main(argv=None) -> None:
    from diffquant import FluxPipeline, default_pipeline_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "docs/samples.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    pipe = FluxPipeline.from_pretrained(args.pipeline or default_pipeline_path())
    images = render(pipe, PROMPTS, args.seed)
    grid(images, PROMPTS).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
