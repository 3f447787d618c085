"""Source -> Ray Data read + per-row decode/validate/resize -> in-memory `CleanSet` and a rejects file.

One Ray task per source unit (a file, a shard, a range of built-in rows) reads and cleans its rows; every row comes
out as a clean row or a reject (records.py), so the counts are exact. `data.max_samples` keeps the first N source
rows in unit order (a Ray Data limit with preserve_order, which also stops reading early).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from tim_ray.data.decode import clean_sample, clean_table
from tim_ray.data.encode import EncoderSpec
from tim_ray.data.geometry import Geometry, Limits
from tim_ray.data.records import CLEAN_SCHEMA, DataError
from tim_ray.data.sources import open_source
from tim_ray.data.stream import encoded_groups, to_batch

ROWS_PER_BLOCK = 128  # clean rows per output block of a read task


def _read_and_clean(units: pa.Table, source, geometry: Geometry, limits: Limits) -> Iterator[pa.Table]:
    for unit in units["unit"].to_pylist():
        rows = []
        for raw in source.read(json.loads(unit)):
            rows.append(clean_sample(raw, geometry, limits))
            if len(rows) == ROWS_PER_BLOCK:
                yield clean_table(rows)
                rows = []
        if rows:
            yield clean_table(rows)


def clean_dataset(cfg) -> ray.data.Dataset:
    """The lazy Ray Dataset of clean and rejected rows (CLEAN_SCHEMA), in source order."""
    geometry = Geometry.of(cfg)
    source = open_source(cfg, geometry)
    units = [{"unit": json.dumps(unit)} for unit in source.units()]
    ds = ray.data.from_items(units, override_num_blocks=len(units))  # one read task per unit
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds = ds.map_batches(_read_and_clean, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"source": source, "geometry": geometry, "limits": Limits.of(cfg)})
    return ds.limit(cfg.data.max_samples) if cfg.data.max_samples else ds


def write_rejects(path: str | Path, rejects: list[dict]) -> None:
    """JSON lines {source, id, sample_id, reason}; written even when empty, so its presence shows the check ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in rejects)


def count_reasons(rejects: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["reason"] for r in rejects).items()))


@dataclass
class CleanSet:
    """Cleaned rows in memory (sorted by sample_id), ready to be ordered, augmented and encoded per rank.

    table: CLEAN_SCHEMA rows without `reject` (uint8 pixels at bucket size). rejects: one record per unusable row.
    """

    table: pa.Table
    rejects: list[dict]
    geometry: Geometry
    bucket_batch_sizes: np.ndarray | None  # rows per global batch of each bucket; None: fixed size
    hflip: bool
    caption_dropout: float
    encoders: EncoderSpec

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def buckets(self) -> np.ndarray:
        return self.table["bucket"].to_numpy()

    def reject_counts(self) -> dict[str, int]:
        """Rejected rows by reason, e.g. {"truncated_image": 3, "empty_caption": 1}."""
        return count_reasons(self.rejects)

    def local_batches(self, groups: list[np.ndarray], seed: int, epoch: int) -> Iterator[dict]:
        """A training batch per group of row positions, encoded on the fly by Ray Data actor pools."""
        for table in encoded_groups(self.table, groups, self.encoders, seed=seed, epoch=epoch, hflip=self.hflip,
                                    caption_dropout=self.caption_dropout):
            yield to_batch(table)


def _split(table: pa.Table, source: str) -> tuple[pa.Table, list[dict]]:
    """(good rows sorted by sample id, reject records sorted by key)."""
    bad = table.filter(pc.not_equal(table["reject"], ""))
    good = table.filter(pc.equal(table["reject"], "")).drop_columns(["reject"]).sort_by("sample_id")
    ids = good["sample_id"].to_numpy()
    duplicate = np.flatnonzero(ids[1:] == ids[:-1])
    if len(duplicate):
        keys = good["key"].to_pylist()
        raise DataError(f"two rows share sample id {ids[duplicate[0]]}: '{keys[duplicate[0]]}' and "
                        f"'{keys[duplicate[0] + 1]}' (a key repeated within a source)")
    rejects = [{"source": source, "id": key, "sample_id": sid, "reason": reason}
               for key, sid, reason in zip(bad["key"].to_pylist(), bad["sample_id"].to_pylist(),
                                           bad["reject"].to_pylist())]
    return good.combine_chunks(), sorted(rejects, key=lambda r: r["id"])


def load_clean(cfg, rejects_path: str | Path, encoders: EncoderSpec | None = None) -> CleanSet:
    """Read and clean the whole source (Ray Data), write the rejects to `rejects_path` and keep the good rows in
    memory. `encoders` overrides the config's (tests use stand-ins)."""
    tables = ray.get(clean_dataset(cfg).to_arrow_refs())
    good, rejects = _split(pa.concat_tables(tables) if tables else CLEAN_SCHEMA.empty_table(), cfg.data.source)
    write_rejects(rejects_path, rejects)
    if good.num_rows == 0:
        raise DataError(f"no usable rows in data.source '{cfg.data.source}' ({len(rejects)} rejected: "
                        f"{count_reasons(rejects)}; see {rejects_path})")
    geometry = Geometry.of(cfg)
    return CleanSet(table=good, rejects=rejects, geometry=geometry,
                    bucket_batch_sizes=geometry.global_batches(cfg.data.bucket_token_budget),
                    hflip=cfg.data.hflip, caption_dropout=cfg.data.caption_dropout,
                    encoders=encoders or EncoderSpec.of(cfg))
