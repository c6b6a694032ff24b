"""Peak memory and time of a FLUX.1 VAE decode, whole and tiled, each in its own process.

The VAE has FLUX.1-dev's shape (84M parameters, random weights, float32 as the CLI runs it on a
CPU); one 1024 x 1024 image is decoded from a [1, 16, 128, 128] latent. diffusers' default tile
is the config's sample_size (1024 pixels), so at 1024 x 1024 nothing is tiled; the smaller
tiles are what a memory budget picks.

    python -m bench.vae_memory                 # whole, tiles of 512 and 256 pixels
    python -m bench.vae_memory --size 512      # a 512 x 512 image
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)


def child(size: int, tile: int | None) -> dict:
    import torch

    from diffquant import AutoencoderKL

    torch.set_num_threads(2)
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE)
    vae = vae.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.02)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if tile:
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    z = torch.randn(1, 16, size // 8, size // 8)
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z).sample
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(tile=tile, seconds=seconds, peak_gb=peak, above_weights_gb=peak - base,
                shape=list(image.shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tiles", type=int, nargs="*", default=[0, 512, 256])
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] or None)))
        return
    print(f"| {args.size} x {args.size} decode | seconds | peak resident GB | above the weights GB |")
    print("|---|---|---|---|")
    for tile in args.tiles:
        out = subprocess.run([sys.executable, "-m", "bench.vae_memory", "--child", str(args.size),
                              str(tile)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = f"tiles of {tile} px" if tile else "whole"
        print(f"| {label} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r['above_weights_gb']:.2f} |")


if __name__ == "__main__":
    main()
