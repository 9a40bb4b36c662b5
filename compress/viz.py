"""Sample grids a person can look at."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compress.io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8; 1 channel is grey, >3 channels show the first 3."""
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        x = x[:, :3]
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4, invert: bool = False) -> Path:
    """Tile images row-major (``nrow`` per row), enlarge by ``scale``, write atomically as PNG."""
    arr = to_uint8(images)
    if invert:
        arr = 255 - arr
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    pad = 1
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    out = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
