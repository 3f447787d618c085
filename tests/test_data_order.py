"""Sample order from metadata alone: a pure function of (seed, epoch), every row once per epoch, a seek is
arithmetic, and a resume at another world size neither skips nor repeats a row."""
from collections import Counter

import numpy as np
import pytest

from tim_ray.data.order import (EpochLayout, _splitmix, draw, fixed_batches, permutation, rank_slice,
                                window_batches)

UNITS = np.array([100, 37, 250, 1, 64, 64, 300, 12, 90, 82])  # rows per unit, in source order (1000 rows)


def positions_of(batches, rank=None, world=1):
    return [p for b in batches for p in (b.positions if rank is None else rank_slice(b.positions, rank, world))]


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    layout = EpochLayout(UNITS, seed=3, epoch=5, window_rows=128)
    units, rows = layout.source_rows(np.arange(layout.num_rows))
    again = EpochLayout(UNITS, seed=3, epoch=5, window_rows=128).source_rows(np.arange(1000))
    assert np.array_equal(units, again[0]) and np.array_equal(rows, again[1])
    for other in (EpochLayout(UNITS, 3, 6, 128), EpochLayout(UNITS, 4, 5, 128)):
        assert not np.array_equal(units, other.source_rows(np.arange(1000))[0])
    # Pinned: the order must not change between machines or numpy versions (checkpoints count positions).
    assert permutation(8, 0, 0, 1).tolist() == [2, 1, 5, 6, 3, 4, 0, 7]


def test_the_hash_is_splitmix64():
    # The first output of the reference splitmix64 seeded with 0.
    assert int(_splitmix(np.zeros(1, dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_an_epoch_names_every_source_row_exactly_once():
    layout = EpochLayout(UNITS, seed=0, epoch=2, window_rows=128)
    units, rows = layout.source_rows(np.arange(layout.num_rows))
    assert layout.num_rows == UNITS.sum()
    assert Counter(zip(units.tolist(), rows.tolist())) == Counter((u, r) for u, n in enumerate(UNITS) for r in range(n))


def test_windows_are_whole_units_of_about_the_window_size_and_rows_stay_in_their_window():
    layout = EpochLayout(UNITS, seed=1, epoch=0, window_rows=128)
    assert sorted(np.concatenate([layout.window_units(w) for w in range(layout.num_windows)])) == list(range(10))
    for window in range(layout.num_windows):
        size = layout.window_size(window)
        assert size == UNITS[layout.window_units(window)].sum()
        flat = np.arange(layout.window_start[window], layout.window_start[window + 1])
        units, _ = layout.source_rows(flat)
        assert set(units) <= set(layout.window_units(window).tolist())  # a window reads only its own units
    # The unit starting past k·W opens window k: never fewer rows than the units can give.
    starts = np.concatenate([[0], np.cumsum(UNITS[layout.unit_order])[:-1]])
    assert layout.num_windows == len(np.unique(starts // 128))


def test_a_window_is_a_real_shuffle_of_its_rows():
    layout = EpochLayout(np.array([4096]), seed=0, epoch=0, window_rows=4096)
    _, rows = layout.source_rows(np.arange(4096))
    displacement = np.abs(rows - np.arange(4096)).mean()
    assert 1300 < displacement < 1430  # a uniform permutation of n rows moves a row n/3 = 1365 on average


def test_a_seek_continues_exactly_where_the_full_order_was():
    layout = EpochLayout(UNITS, seed=0, epoch=1, window_rows=200)
    whole = positions_of(fixed_batches(layout, 0, 8))
    for consumed in (0, 8, 400, 992):
        assert positions_of(fixed_batches(layout, consumed, 8)) == whole[consumed:]
    per_window = [b for w in range(layout.num_windows) for b in fixed_batches(layout, 40, 8, window=w)]
    assert positions_of(per_window) == whole[40:]  # each batch planned once, by the window it starts in


def test_drop_last_drops_only_the_partial_batch():
    batches = fixed_batches(EpochLayout(np.array([103]), 0, 0, 64), 0, 8)
    assert len(batches) == 12 and all(len(b.positions) == 8 for b in batches)
    assert [b.after for b in batches] == list(range(8, 97, 8))


def test_ranks_split_each_global_batch_and_cover_it_once():
    batches = fixed_batches(EpochLayout(UNITS, 1, 0, 128), 0, 12)
    per_rank = [positions_of(batches, rank, 3) for rank in range(3)]
    assert {len(p) for p in per_rank} == {4 * len(batches)}
    assert sorted(sum(per_rank, [])) == list(range(12 * len(batches)))


def test_resume_at_another_world_size_sees_each_sample_once():
    layout = EpochLayout(UNITS, seed=1, epoch=4, window_rows=128)
    before = fixed_batches(layout, 0, 8)[:5]  # 5 steps of 2 workers x 4
    consumed = [p for rank in range(2) for p in positions_of(before, rank, 2)]
    after = fixed_batches(layout, before[-1].after, 12)  # then 3 workers x 4
    rest = [p for rank in range(3) for p in positions_of(after, rank, 3)]
    assert Counter(consumed + rest) == Counter(range(40 + 12 * len(after)))
    assert 1000 - 40 - 12 * len(after) < 12  # only the final partial batch is left out


def test_buckets_never_mix_and_resume_across_world_sizes():
    layout = EpochLayout(UNITS, seed=7, epoch=1, window_rows=256)
    buckets = {w: np.random.default_rng(w).integers(0, 3, layout.window_size(w)) for w in range(layout.num_windows)}
    sizes = np.array([8, 6, 10])
    epoch = [b for w in range(layout.num_windows) for b in window_batches(layout, w, buckets[w], sizes)]
    for batch in epoch:
        window = layout.window_of(batch.positions[0])
        _, local = layout.locate(batch.positions)
        kinds = set(buckets[window][local].tolist())
        assert len(kinds) == 1 and len(batch.positions) == sizes[kinds.pop()]
    first_window = [b for b in epoch if layout.window_of(b.positions[0]) == 0]
    assert len({len(b.positions) for b in first_window[:6]}) > 1  # buckets interleave, not one after another
    afters = [b.after for b in epoch]
    assert afters == sorted(afters) and len(set(afters)) == len(afters)  # a position names one batch
    done = 7
    resumed = [b for w in range(layout.window_of(epoch[done - 1].after), layout.num_windows)
               for b in window_batches(layout, w, buckets[w], sizes) if b.after > epoch[done - 1].after]
    assert [b.after for b in resumed] == afters[done:]
    first = [p for rank in range(2) for p in positions_of(epoch[:done], rank, 2)]
    rest = [p for rank in range(3) for p in positions_of(resumed, rank, 3)]
    assert Counter(first + rest) == Counter(positions_of(epoch))


def test_bad_positions_and_batches_are_errors():
    layout = EpochLayout(np.array([50]), 0, 0, 64)
    with pytest.raises(ValueError, match="outside this epoch"):
        fixed_batches(layout, 51, 8)
    with pytest.raises(ValueError, match="positive global_batch"):
        fixed_batches(layout, 0, 0)
    with pytest.raises(ValueError, match="cannot feed"):
        rank_slice(np.arange(2), 0, 3)
    with pytest.raises(ValueError, match="window_rows"):
        EpochLayout(np.array([50]), 0, 0, 0)


def test_draws_depend_only_on_seed_epoch_and_sample_id():
    ids = np.arange(-50_000, 50_000, dtype=np.int64) * 7919
    counts = np.full(len(ids), 6)
    full = draw(ids, counts, 0, 3, hflip=True, caption_dropout=0.1)
    part = draw(ids[1234:1300], counts[1234:1300], 0, 3, hflip=True, caption_dropout=0.1)
    assert np.array_equal(part.flip, full.flip[1234:1300]) and np.array_equal(part.caption, full.caption[1234:1300])
    assert abs(full.drop.mean() - 0.1) < 0.005 and abs(full.flip.mean() - 0.5) < 0.005
    assert Counter(full.caption.tolist()).keys() == set(range(6))
    other_epoch = draw(ids, counts, 0, 4, hflip=True, caption_dropout=0.1)
    assert not np.array_equal(other_epoch.flip, full.flip)
    assert not draw(ids, counts, 0, 3, hflip=False, caption_dropout=0.0).flip.any()
