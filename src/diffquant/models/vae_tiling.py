"""Tiled VAE passes as diffusers' AutoencoderKL runs them, op for op, so a tiled decode (or
encode) here equals diffusers' on the same weights: the input is cut into squares of
``tile_in`` pixels every ``tile_in * (1 - overlap)``, each square goes through the encoder or
decoder alone, and each output tile is blended linearly into the one above and the one to its
left over ``tile_out * overlap`` pixels, then cropped. Memory then grows with the tile, not the
image; the blends leave faint seams that an untiled pass does not have.

Example:
    >>> import torch
    >>> x = torch.arange(64.).view(1, 1, 8, 8)
    >>> torch.equal(tiled(lambda t: t, x, tile_in=4, tile_out=4, overlap=0.0), x)
    True
"""

from __future__ import annotations

from typing import Callable

import torch


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """In place: b's first ``extent`` rows fade in over a's last (diffusers' blend_v, row by row:
    its per-row float scalars give bits a vectorised form in bf16 would not)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """In place: b's first ``extent`` columns fade in over a's last (diffusers' blend_h)."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int,
          tile_out: int, overlap: float) -> torch.Tensor:
    """fn over the tiles of x [B, C, H, W] (fn maps a ``tile_in`` square to a ``tile_out``
    one), blended and cropped as diffusers' tiled_encode / tiled_decode do."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):  # the blends write into the tiles, as diffusers' do
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = blend_h(row[j - 1], tile, extent)
            parts.append(tile[:, :, :keep, :keep])
        out.append(torch.cat(parts, dim=3))
    return torch.cat(out, dim=2)
