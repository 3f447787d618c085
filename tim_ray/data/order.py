"""Sample order and per-sample randomness as pure functions of (seed, epoch, position or sample id).

Ray Data has no resumable iterator, so the order is computed here and nowhere else:

- `epoch_order(n, seed, epoch)`: a permutation of the row positions 0..n-1 (rows sorted by sample id).
- `epoch_batches(...)`: that epoch's global batches after the first `start_sample` samples. Fixed size: the
  permutation cut into `global_batch` rows. Buckets: each bucket's rows (in permutation order) cut into that
  bucket's global batch size, and those batches shuffled; the sizes come from the token budget, not the world size.
- `rank_slice(batch, rank, world)`: rank k's contiguous share of a global batch.

Resume = the same (seed, epoch) and start_sample = samples consumed so far in the epoch. The flat sample order does
not depend on the world size or on the global batch of fixed-size data, so a run resumed with another world size
sees every remaining sample exactly once. With buckets, start_sample must fall on a global-batch boundary (it
always does when it counts whole steps).

Randomness is a counter-based hash (splitmix64) rather than a seeded generator: it is the same on every numpy
version and machine, and any sample's draw is computed without generating anyone else's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Independent streams of the hash, one per use.
ORDER, BUCKET_BATCHES, FLIP, DROPOUT, CAPTION, NOISE = range(1, 7)
_MASK64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash64(values, *keys: int) -> np.ndarray:
    """A 64-bit hash of each value (an int array, negative ints allowed) under the integer keys."""
    state = np.zeros(np.shape(values), dtype=np.uint64)
    for key in keys:
        state = _splitmix(state ^ np.uint64(key & _MASK64))
    return _splitmix(state ^ np.asarray(values, dtype=np.int64).view(np.uint64))


def uniform(values, *keys: int) -> np.ndarray:
    """A float64 in [0, 1) per value, from the top 53 bits of its hash."""
    return (hash64(values, *keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of row positions 0..num_rows-1."""
    return np.argsort(hash64(np.arange(num_rows), seed, epoch, ORDER), kind="stable")


def _bucket_batches(order: np.ndarray, buckets: np.ndarray, sizes: np.ndarray, seed: int, epoch: int,
                    drop_last: bool) -> list[np.ndarray]:
    batches, ids = [], []
    for bucket, size in enumerate(sizes):
        members = order[buckets[order] == bucket]
        stop = len(members) - len(members) % size if drop_last else len(members)
        for k, start in enumerate(range(0, stop, size)):
            batches.append(members[start:start + size])
            ids.append(bucket * 2**32 + k)
    shuffled = np.argsort(hash64(np.array(ids, dtype=np.int64), seed, epoch, BUCKET_BATCHES), kind="stable")
    return [batches[i] for i in shuffled]


def _skip(batches: list[np.ndarray], start_sample: int) -> list[np.ndarray]:
    boundaries = np.cumsum([0] + [len(b) for b in batches])
    hit = np.flatnonzero(boundaries == start_sample)
    if not len(hit):
        raise ValueError(f"start_sample {start_sample} is not on a global-batch boundary of this epoch; resume from "
                         "a count of whole steps")
    return batches[hit[0]:]


def epoch_batches(buckets: np.ndarray, bucket_batch_sizes: np.ndarray | None, seed: int, epoch: int,
                  start_sample: int = 0, global_batch: int | None = None,
                  drop_last: bool = True) -> list[np.ndarray]:
    """The epoch's remaining global batches, as arrays of row positions.

    buckets: the bucket id of each row position. bucket_batch_sizes: rows per global batch of each bucket, or None
    for fixed-size data, which takes `global_batch` instead. drop_last drops the final partial batch (of each
    bucket, with buckets) so that every global batch is full.
    """
    order = epoch_order(len(buckets), seed, epoch)
    if not 0 <= start_sample <= len(order):
        raise ValueError(f"start_sample {start_sample} is outside this epoch of {len(order)} samples")
    if bucket_batch_sizes is None:
        if not global_batch or global_batch <= 0:
            raise ValueError("fixed-size data needs a positive global_batch")
        rest = order[start_sample:]
        stop = len(rest) - len(rest) % global_batch if drop_last else len(rest)
        return [rest[i:i + global_batch] for i in range(0, stop, global_batch)]
    if global_batch is not None:
        raise ValueError("bucketed data sizes its global batches from data.bucket_token_budget; pass "
                         "global_batch=None")
    return _skip(_bucket_batches(order, buckets, bucket_batch_sizes, seed, epoch, drop_last), start_sample)


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s share of a global batch: contiguous, sizes differing by at most one across ranks."""
    if len(batch) < world:
        raise ValueError(f"a global batch of {len(batch)} rows cannot feed {world} ranks; use a larger batch or "
                         "drop_last")
    return np.array_split(batch, world)[rank]


@dataclass(frozen=True)
class Draws:
    """Per-sample augmentation choices of one epoch."""

    flip: np.ndarray  # bool: mirror horizontally
    drop: np.ndarray  # bool: replace the caption by ""
    caption: np.ndarray  # int: which of the row's captions


def draw(sample_ids: np.ndarray, caption_counts: np.ndarray, seed: int, epoch: int, hflip: bool,
         caption_dropout: float) -> Draws:
    """The epoch's choices for these samples; each depends only on (seed, epoch, sample id)."""
    flip = uniform(sample_ids, seed, epoch, FLIP) < 0.5 if hflip else np.zeros(len(sample_ids), dtype=bool)
    drop = uniform(sample_ids, seed, epoch, DROPOUT) < caption_dropout
    caption = np.floor(uniform(sample_ids, seed, epoch, CAPTION) * caption_counts).astype(np.int64)
    return Draws(flip=flip, drop=drop, caption=caption)
