"""Image conversion and grids. Loggers get uint8 (W&B renders float images as black)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """``[B,C,H,W]`` in [-1,1] -> ``[B,H,W,C]`` uint8 (the OpenAI npz convention)."""
    return (
        ((x.detach().float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
    )


def image_grid(x: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """``[B,C,H,W]`` in [-1,1] -> one ``[H',W',C]`` uint8 grid (C = 1 becomes 3 channels)."""
    imgs = to_uint8(x).numpy()
    b, h, w, c = imgs.shape
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, np.uint8
    )
    for i in range(b):
        r, col = divmod(i, nrow)
        y, xx = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, xx : xx + w] = imgs[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a ``[H,W,3]`` uint8 array as PNG, optionally upscaled by an integer factor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def to_pil(x: Tensor, nrow: int | None = None, scale: int = 2) -> Image.Image:
    """``[B,C,H,W]`` in [-1,1] -> a PIL grid image (notebooks display it inline)."""
    img = Image.fromarray(image_grid(x, nrow=nrow))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
