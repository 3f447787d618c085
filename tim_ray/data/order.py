"""Sample order and per-sample randomness as pure functions of (seed, epoch, position), computed from metadata only.

Ray Data has no resumable iterator, so the order is computed here and nowhere else. A source is a list of units
(a parquet row group, a tar shard, a range of built-in rows) whose row counts are known before any row is read.
An epoch's order (`EpochLayout`) is:

1. the units in a seeded permutation of (seed, epoch);
2. cut into windows: unit u (in that order) starts at flat row s_u and belongs to window floor(s_u / W), W =
   data.shuffle_window; a window is whole units, about W rows (one unit larger than W is a window of its own);
3. inside each window, its rows in a seeded permutation of (seed, epoch, window).

The flat position p (0..N-1) of an epoch thus names one source row, found in O(log units) without reading
anything: seeking to any step costs one window read. This is the shuffle MosaicML Streaming and torchdata use (a
shard permutation plus a bounded shuffle buffer), with the buffer replaced by a whole-window permutation so that
it is a pure function of the position.

Global batches (`fixed_batches`, `window_batches`):
- Fixed size: batch k of the epoch is flat [start + k·G, start + (k+1)·G); the flat order does not depend on the
  world size or G, so a run resumed at another world size (another G) sees every remaining row exactly once.
  The final partial batch of the epoch is dropped.
- Aspect buckets: a window's rows, in their permuted order, go to their bucket; each bucket is cut into its global
  batch size (from the token budget, independent of the world size) and the window's batches are shuffled. Rows
  that do not fill a last batch of their bucket wait for another epoch (a different window then holds them).
  The position after a batch is the window's start plus the rows of its batches so far; it maps back to
  (window, batches done) uniquely.
- `rank_slice(batch, rank, world)`: rank k's contiguous share of a global batch.

Randomness is a counter-based hash (splitmix64) rather than a seeded generator: it is the same on every numpy
version and machine, and any row's draw is computed without generating anyone else's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Independent streams of the hash, one per use.
ORDER, BUCKET_BATCHES, FLIP, DROPOUT, CAPTION, NOISE, WINDOW = range(1, 8)
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


def permutation(n: int, *keys: int) -> np.ndarray:
    """A permutation of 0..n-1, a pure function of the keys."""
    return np.argsort(hash64(np.arange(n), *keys), kind="stable")


class EpochLayout:
    """One epoch's order over units with these row counts (in source order). Pure numpy, built in milliseconds
    for a million units; see the module docstring."""

    def __init__(self, unit_rows: np.ndarray, seed: int, epoch: int, window_rows: int):
        if window_rows <= 0:
            raise ValueError(f"window_rows must be positive, not {window_rows}")
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)
        self.seed, self.epoch = seed, epoch
        self.unit_order = permutation(len(self.unit_rows), seed, epoch, ORDER)
        ordered = self.unit_rows[self.unit_order]
        starts = np.concatenate([[0], np.cumsum(ordered)])  # flat start of each unit in order, then N
        self.num_rows = int(starts[-1])
        window_id = starts[:-1] // window_rows
        # The first unit (in order) of each window; empty units never open a window of their own.
        first = np.flatnonzero(np.diff(np.concatenate([[-1], window_id])) != 0)
        self.window_first_unit = np.concatenate([first, [len(ordered)]])  # bounds into unit_order
        self.window_start = starts[self.window_first_unit]  # flat start of each window, then N
        self.unit_start = starts  # flat start of each unit in order
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        return len(self.window_start) - 1

    def window_units(self, window: int) -> np.ndarray:
        """The source unit indices of a window, in the order their rows are concatenated."""
        return self.unit_order[self.window_first_unit[window]:self.window_first_unit[window + 1]]

    def window_size(self, window: int) -> int:
        return int(self.window_start[window + 1] - self.window_start[window])

    def window_permutation(self, window: int) -> np.ndarray:
        """Entry i: the window-local row (units concatenated) at flat position window_start + i."""
        if window not in self._permutations:
            self._permutations[window] = permutation(self.window_size(window), self.seed, self.epoch, WINDOW,
                                                     window)
        return self._permutations[window]

    def window_of(self, positions) -> np.ndarray:
        """The window holding each flat position."""
        return np.searchsorted(self.window_start, positions, side="right") - 1

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window, window-local row) of each flat position."""
        positions = np.asarray(positions, dtype=np.int64)
        windows = self.window_of(positions)
        local = np.empty_like(positions)
        for window in np.unique(windows):
            mine = windows == window
            local[mine] = self.window_permutation(int(window))[positions[mine] - self.window_start[window]]
        return windows, local

    def source_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source unit, row within that unit) of each flat position: which row the position names."""
        positions = np.asarray(positions, dtype=np.int64)
        windows, local = self.locate(positions)
        flat_row = self.window_start[windows] + local  # the row's place in the unit concatenation
        ordinal = np.searchsorted(self.unit_start, flat_row, side="right") - 1
        return self.unit_order[ordinal], flat_row - self.unit_start[ordinal]


@functools.lru_cache(maxsize=8)
def _cached_layout(unit_rows: bytes, seed: int, epoch: int, window_rows: int) -> EpochLayout:
    return EpochLayout(np.frombuffer(unit_rows, dtype=np.int64), seed, epoch, window_rows)


def epoch_layout(unit_rows: np.ndarray, seed: int, epoch: int, window_rows: int) -> EpochLayout:
    """EpochLayout, cached per process (every task of a worker asks for the same few epochs)."""
    return _cached_layout(np.asarray(unit_rows, dtype=np.int64).tobytes(), seed, epoch, window_rows)


@dataclass(frozen=True)
class PlannedBatch:
    """One global batch: its flat positions and the epoch position after it."""

    positions: np.ndarray
    after: int  # samples of the epoch consumed once this batch is done


def fixed_batches(layout: EpochLayout, start: int, global_batch: int, window: int | None = None) -> list[PlannedBatch]:
    """The epoch's remaining fixed-size global batches after `start` samples (the partial last one dropped); with
    `window`, only those whose first position lies in that window (a batch may reach into the next window)."""
    if global_batch <= 0:
        raise ValueError("fixed-size data needs a positive global_batch")
    if not 0 <= start <= layout.num_rows:
        raise ValueError(f"start {start} is outside this epoch of {layout.num_rows} samples")
    first, stop = 0, (layout.num_rows - start) // global_batch
    if window is not None:
        low, high = int(layout.window_start[window]), int(layout.window_start[window + 1])
        first = max(first, -(-(low - start) // global_batch))
        stop = min(stop, -(-(high - start) // global_batch))
    return [PlannedBatch(np.arange(start + k * global_batch, start + (k + 1) * global_batch),
                         after=start + (k + 1) * global_batch) for k in range(first, stop)]


def window_batches(layout: EpochLayout, window: int, buckets: np.ndarray, sizes: np.ndarray) -> list[PlannedBatch]:
    """A window's bucketed global batches, shuffled. buckets: the bucket of each window-local row (units
    concatenated); sizes: rows per global batch of each bucket."""
    order = layout.window_permutation(window)  # flat offset i -> local row
    row_bucket = np.asarray(buckets)[order]
    batches, ids = [], []
    for bucket, size in enumerate(np.asarray(sizes)):
        offsets = np.flatnonzero(row_bucket == bucket)
        for k in range(len(offsets) // size):
            batches.append(offsets[k * size:(k + 1) * size])
            ids.append(bucket * 2**32 + k)
    shuffled = np.argsort(hash64(np.array(ids, dtype=np.int64), layout.seed, layout.epoch, BUCKET_BATCHES, window),
                          kind="stable")
    start, done, out = int(layout.window_start[window]), 0, []
    for i in shuffled:
        done += len(batches[i])
        out.append(PlannedBatch(start + batches[i], after=start + done))
    return out


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s share of a global batch: contiguous, sizes differing by at most one across ranks."""
    if len(batch) < world:
        raise ValueError(f"a global batch of {len(batch)} rows cannot feed {world} ranks; use a larger batch")
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
