"""Output sizes: one fixed size, or aspect-ratio buckets (the native-resolution strategy).

Buckets keep roughly the area of data.height x data.width, have sides that are multiples of data.bucket_multiple,
and span aspect ratios up to data.bucket_max_aspect. An image goes to the bucket nearest its aspect ratio (in log
space) and is resized to cover it, then centre-cropped, so its aspect ratio changes by at most half a bucket step.

A token is one bucket_multiple x bucket_multiple square; a bucket's global batch holds
bucket_token_budget // tokens(bucket) images, so every global batch carries about the same number of tokens and the
sizes do not depend on the world size (which keeps the sample order valid across an elastic resize).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

PIXEL_CODEC = "pixel"


@dataclass(frozen=True)
class Limits:
    """Images outside these are rejected as `absurd_size` (checked from the header, before decoding pixels)."""

    min_side: int
    max_pixels: int
    max_aspect: float

    @staticmethod
    def of(cfg) -> Limits:
        d = cfg.data
        return Limits(min_side=d.min_image_side, max_pixels=d.max_image_pixels, max_aspect=d.max_aspect_ratio)

    def allows(self, width: int, height: int) -> bool:
        return (min(width, height) >= self.min_side and width * height <= self.max_pixels
                and max(width, height) <= self.max_aspect * min(width, height))


@dataclass(frozen=True)
class Geometry:
    channels: int  # 1 (grey) or 3 (RGB)
    sizes: tuple[tuple[int, int], ...]  # (height, width) per bucket id; one entry for a fixed size
    multiple: int  # pixels per token side

    @staticmethod
    def of(cfg) -> Geometry:
        d = cfg.data
        sizes = (bucket_sizes(d.height, d.width, d.bucket_multiple, d.bucket_max_aspect) if d.aspect_buckets
                 else ((d.height, d.width),))
        return Geometry(channels=pixel_channels(cfg), sizes=sizes, multiple=d.bucket_multiple)

    @property
    def bucketed(self) -> bool:
        return len(self.sizes) > 1

    def bucket_of(self, height: int, width: int) -> int:
        if not self.bucketed:
            return 0
        aspect = math.log(height / width)
        return min(range(len(self.sizes)), key=lambda b: abs(math.log(self.sizes[b][0] / self.sizes[b][1]) - aspect))

    def global_batches(self, token_budget: int) -> np.ndarray | None:
        """Rows per global batch of each bucket, or None for a fixed size (the caller's global batch applies)."""
        if not self.bucketed:
            return None
        tokens = np.array([(h // self.multiple) * (w // self.multiple) for h, w in self.sizes])
        return np.maximum(token_budget // tokens, 1)


def bucket_sizes(height: int, width: int, multiple: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    """(h, w) pairs with h·w <= height·width, sides multiples of `multiple`, aspect within max_aspect, the widest
    w for each h; with every size its transpose (tall and wide images get mirror-image choices); tall to wide."""
    area = height * width
    sizes = set()
    for h in range(multiple, area // multiple + 1, multiple):
        w = area // h // multiple * multiple
        if w >= multiple and max(h / w, w / h) <= max_aspect:
            sizes |= {(h, w), (w, h)}
    return tuple(sorted(sizes, key=lambda s: (-s[0] / s[1], -s[0])))


def pixel_channels(cfg) -> int:
    """Channels of the decoded pixels: a grey source (Fashion-MNIST) stays grey in pixel space; latent codecs get
    RGB."""
    from tim_ray.data.sources import source_class  # the sources import this module

    return 1 if source_class(cfg.data.source).grey and cfg.model.codec == PIXEL_CODEC else 3


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover (height, width), then centre-crop to it."""
    height, width = size
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)
