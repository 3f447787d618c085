"""One source row -> one clean row or one reject, never an exception: decode, validate, resize/crop, caption check.

This runs per row inside our own Ray Data map step (Ray's own image decoders fail the whole dataset on one corrupt
file). Only the errors PIL raises for bad input are caught; anything else is a bug and propagates.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from tim_ray.data.geometry import Geometry, Limits, fit
from tim_ray.data.records import (
    ABSURD_SIZE,
    CAPTION_NOT_UTF8,
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    EMPTY_IMAGE,
    INVALID_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    RawSample,
)

WHITE = (255, 255, 255, 255)


class Rejected(Exception):
    """Internal: this row cannot be used, for `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_image(data: bytes, limits: Limits, geometry: Geometry) -> tuple[Image.Image, int]:
    """(decoded image, its bucket), or Rejected. The size is checked from the header, before any pixel is decoded;
    a JPEG decodes at the smallest DCT scale that still covers its bucket (several times faster when shrinking)."""
    if len(data) == 0:
        raise Rejected(EMPTY_IMAGE)
    try:
        with warnings.catch_warnings():
            # Corrupt headers make PIL warn as well as fail; the reject record says it once.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if not limits.allows(*image.size):
                raise Rejected(ABSURD_SIZE)
            bucket = geometry.bucket_of(image.height, image.width)
            height, width = geometry.sizes[bucket]
            image.draft("L" if geometry.channels == 1 else "RGB", (width, height))
            image.load()
    except Image.DecompressionBombError:
        raise Rejected(ABSURD_SIZE) from None
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE) from None
    except OSError as exc:
        raise Rejected(TRUNCATED_IMAGE if "truncated" in str(exc).lower() else CORRUPT_IMAGE) from None
    except (SyntaxError, ValueError, EOFError):  # what some PIL plugins raise for broken chunks
        raise Rejected(CORRUPT_IMAGE) from None
    return image, bucket


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Grey ("L") or "RGB"; transparent pixels become white rather than whatever colour they hide."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def clean_captions(raw: str | bytes | list | None) -> list[str]:
    """Non-empty, stripped UTF-8 captions, or Rejected. Empty entries of a list are skipped; any undecodable one
    rejects the row (the file is broken, not just that caption)."""
    if raw is None:
        raise Rejected(MISSING_CAPTION)
    captions = []
    for item in raw if isinstance(raw, list) else [raw]:
        if item is None:
            continue
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(CAPTION_NOT_UTF8) from None
        if not isinstance(item, str):  # e.g. a number in caption JSON
            raise Rejected(INVALID_CAPTION)
        try:
            item.encode("utf-8")  # lone surrogates (from JSON "\ud800" escapes) are not UTF-8 either
        except UnicodeEncodeError:
            raise Rejected(CAPTION_NOT_UTF8) from None
        if item.strip():
            captions.append(item.strip())
    if not captions:
        raise Rejected(EMPTY_CAPTION)
    return captions


def _image(raw: bytes | np.ndarray | None, limits: Limits, geometry: Geometry) -> tuple[Image.Image, int]:
    if raw is None:
        raise Rejected(MISSING_IMAGE)
    if isinstance(raw, np.ndarray):
        image = Image.fromarray(raw)
        bucket = geometry.bucket_of(image.height, image.width)
    else:
        image, bucket = open_image(raw, limits, geometry)
    return to_channels(image, geometry.channels), bucket


def clean_sample(raw: RawSample, geometry: Geometry, limits: Limits) -> dict:
    """A clean row {sample_id, key, label, captions, pixels (uint8 array (H, W, C)), bucket, scene, reject}:
    pixels at the bucket size, or a row without pixels (None) whose `reject` names the reason."""
    row = {"sample_id": raw.sample_id, "key": raw.key, "label": raw.label, "captions": [], "pixels": None,
           "bucket": -1, "scene": raw.scene, "reject": raw.reject}
    if raw.reject:
        return row
    try:
        captions = clean_captions(raw.captions)
        image, bucket = _image(raw.image, limits, geometry)
    except Rejected as rejected:
        return {**row, "reject": rejected.reason}
    size = geometry.sizes[bucket]
    pixels = np.asarray(fit(image, size), dtype=np.uint8).reshape(*size, -1)
    return {**row, "captions": captions, "pixels": pixels, "bucket": bucket}
