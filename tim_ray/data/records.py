"""What a source yields (`RawSample`), its stable id, and why a row is rejected.

A rejected row keeps its identity and one reason from `REJECT_REASONS`; training and precompute write it to a rejects
file and count it (rejects.py). Nothing leaves the pipeline without either a clean row or a reject record.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tim_ray.config import ConfigError


class DataError(ConfigError):
    """Bad data input (missing path, no files, unusable columns, wrong precompute dir). One line, names the input."""


class StoreUnreachable(Exception):
    """An object store or the hub that cannot be reached or does not answer within data.connect_timeout_s: a
    runtime failure (exit 1; the input may be right and the network down), not bad input (a DataError, exit 2).
    One line naming the URL and, for no answer, the time waited. Not a ConfigError: in a Ray worker it is a
    failure Ray may retry, not a bad_config end."""


# Reject reasons. Row-level ones are about one image-text pair (`invalid_caption`: unparseable caption JSON or a
# caption that is not text); `unreadable_file` is a whole file (a parquet file without a footer, a tar shard cut
# short) whose unread rows cannot be named one by one.
EMPTY_IMAGE = "empty_image"
MISSING_IMAGE = "missing_image"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
ABSURD_SIZE = "absurd_size"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
INVALID_CAPTION = "invalid_caption"
UNREADABLE_FILE = "unreadable_file"
REJECT_REASONS = (EMPTY_IMAGE, MISSING_IMAGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, CORRUPT_IMAGE, ABSURD_SIZE,
                  MISSING_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8, INVALID_CAPTION, UNREADABLE_FILE)


@dataclass
class RawSample:
    """One source row before cleaning.

    image: encoded file bytes, or a decoded uint8 array (H, W) / (H, W, C) from a built-in source, or None.
    captions: a caption or a list of them, as str or undecoded bytes, or None.
    reject: set by a reader that already knows the row is unusable (e.g. invalid JSON metadata).
    """

    sample_id: int
    key: str
    image: bytes | np.ndarray | None
    captions: str | bytes | list | None
    label: int = -1
    scene: str = ""
    reject: str = ""


def stable_id(key: str) -> int:
    """A 63-bit id from a row's key (its path relative to the source root plus its place in the file): the same
    row gets the same id on every run and machine, whatever order the files are read in."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
