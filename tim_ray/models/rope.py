"""2D rotary position embedding (RoPE) for the image tokens of TiM (docs/math.md §11).

The head dim is split in two halves, one per grid axis. Within a half of width d, pair i of the interleaved
pairs (2i, 2i+1) rotates by the angle `pos · 10000^(-2i/d)`. The first half takes the column position and the
second half the row position; that is what the official model does on square grids, so square-trained
checkpoints behave identically under either grid mapping.

Grid mappings (docs/math.md B1), for a grid of h rows and w columns with tokens in row-major order n = row·w + col:
- `row_col`: token n gets (col, row), the positions of its place in the image.
- `official`: token n gets (n mod h, n div h), which equals (col, row) only when h == w. The released
  multi-aspect text-to-image checkpoint was trained with this mapping, so loading it needs this flag.
"""
from __future__ import annotations

import torch

GRID_MAPPINGS = ("row_col", "official")
ROPE_BASE = 10000.0


def grid_positions(h: int, w: int, mapping: str = "row_col", device=None) -> torch.Tensor:
    """(h·w, 2) int64 positions (first-half axis, second-half axis) of the row-major tokens of an h×w grid."""
    n = torch.arange(h * w, device=device)
    if mapping == "row_col":
        return torch.stack([n % w, n // w], dim=1)
    if mapping == "official":
        return torch.stack([n % h, n // h], dim=1)
    raise ValueError(f"rope grid mapping '{mapping}' is not one of {', '.join(GRID_MAPPINGS)}")


def rope_tables(positions: torch.Tensor, head_dim: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (N, head_dim), for `positions` (N, 2) of any numeric dtype."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, device=positions.device, dtype=dtype) / axis_dim
    freqs = ROPE_BASE ** -exponents  # (axis_dim / 2,)
    angles = positions.to(dtype)[:, :, None] * freqs  # (N, 2, axis_dim / 2)
    angles = angles.repeat_interleave(2, dim=-1).flatten(1)  # (N, head_dim): pair-repeated, first axis first
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each interleaved pair (a, b) -> (-b, a): a quarter turn of every 2D sub-plane."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, head_dim) by the per-token tables (N, head_dim)."""
    return x * cos + rotate_pairs(x) * sin
