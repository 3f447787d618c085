"""Sample grids: one row per step count, one column per prompt, the same starting noise down each column, so a
row-to-row comparison shows what more steps buy."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from tim_ray.config import SampleConfig
from tim_ray.eval.generate import sample_images
from tim_ray.transition.paths import TransitionPath


@torch.no_grad()
def sample_rows(model, cond: dict, uncond: dict | None, shape: tuple[int, ...], nfe_list: list[int],
                path: TransitionPath, config: SampleConfig, seed: int, decode=None) -> torch.Tensor:
    """Images (len(nfe_list), B, C, H, W) in [-1, 1] for the B conditions in `cond`, starting every row from the
    same noise (drawn from `seed`). `decode` maps latents to images (identity for pixel space)."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.stack([sample_images(model, cond, uncond, noise, nfe, path, config, seed, decode)
                        for nfe in nfe_list])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) in [-1, 1] -> (..., H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()


def grid_image(rows: torch.Tensor, row_labels: list[str], scale: int = 2, margin: int = 44) -> Image.Image:
    """Tile (R, B, C, H, W) images into one RGB picture with a label left of each row."""
    pixels = to_uint8(rows)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    n_rows, n_cols, h, w, _ = pixels.shape
    tiles = pixels.transpose(0, 2, 1, 3, 4).reshape(n_rows * h, n_cols * w, 3)
    body = Image.fromarray(tiles).resize((n_cols * w * scale, n_rows * h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (body.width + margin, body.height), "white")
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(row_labels):
        draw.text((4, i * h * scale + h * scale // 2 - 5), label, fill="black")
    return canvas
