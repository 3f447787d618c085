"""Parquet files of image bytes and captions (a local path, a glob or a pyarrow URI such as s3://bucket/prefix).

Columns are data.image_column / data.caption_column when set, else found by name: the image in one of IMAGE_COLUMNS
(binary, or a Hugging Face struct with a `bytes` field), the caption(s) in one of CAPTION_COLUMNS (string, binary or
a list of strings), an optional int `label`. A row's key is "<file relative to the root>#<row number in the file>".

A unit is one row group; its row count comes from the file footer. Footers are read in parallel threads before
training: the only pass over the data set a run makes before its first step. A file whose footer cannot be read is
one unit of one `unreadable_file` row.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tim_ray.data.records import DataError, RawSample, stable_id
from tim_ray.data.sources.filesystem import FileSet, FileSource, list_files

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
CAPTION_COLUMNS = ("captions", "caption", "text", "txt")
LABEL_COLUMN = "label"
ROWS_PER_READ = 256
FOOTER_THREADS = 32  # footer reads are small and latency-bound on object stores


def _pick(names: list[str], chosen: str, candidates: tuple[str, ...], what: str, where: str) -> str:
    if chosen:
        if chosen not in names:
            raise DataError(f"{where} has no column '{chosen}' (data.{what}_column); it has {', '.join(names)}")
        return chosen
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{where} has no {what} column (looked for {', '.join(candidates)}; it has {', '.join(names)}); "
                    f"set data.{what}_column")


class ParquetSource(FileSource):
    name = "parquet"

    def __init__(self, path: str, image_column: str = "", caption_column: str = "", timeout_s: float | None = None):
        self.files: FileSet = list_files(path, ("parquet",), timeout_s=timeout_s)
        first = self.files.full_path(self.files.keys[0])
        try:
            with self.files.filesystem().open_input_file(first) as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot read the schema of '{first}': {str(exc).splitlines()[0]}") from None
        self.image_column = _pick(schema.names, image_column, IMAGE_COLUMNS, "image", first)
        self.caption_column = _pick(schema.names, caption_column, CAPTION_COLUMNS, "caption", first)
        self.label_column = LABEL_COLUMN if LABEL_COLUMN in schema.names else None

    def _row_groups(self, key: str) -> list[dict]:
        try:
            with self.files.filesystem().open_input_file(self.files.full_path(key)) as handle:
                meta = pq.ParquetFile(handle).metadata
        except (pa.ArrowInvalid, OSError):
            return [{"name": key, "row_group": -1, "first_row": 0, "rows": 1}]
        units, first = [], 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if rows:
                units.append({"name": key, "row_group": group, "first_row": first, "rows": rows})
            first += rows
        return units

    def units(self) -> list[dict]:
        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            return [unit for units in pool.map(self._row_groups, self.files.keys) for unit in units]

    def _batches(self, unit: dict) -> Iterator[pa.RecordBatch]:
        columns = [c for c in (self.image_column, self.caption_column, self.label_column) if c]
        with self.files.filesystem().open_input_file(self.files.full_path(unit["name"])) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=ROWS_PER_READ, row_groups=[unit["row_group"]],
                                                           columns=columns)

    def read(self, unit: dict) -> Iterator[RawSample]:
        """The rows of one row group. Rows that cannot be read (missing columns, a file cut short) are left out:
        the window reader names each one `unreadable_file` (tim_ray.data.windows)."""
        if unit["row_group"] < 0:
            return
        row = unit["first_row"]
        try:
            for batch in self._batches(unit):
                images = batch.column(self.image_column)
                if pa.types.is_struct(images.type):
                    images = pc.struct_field(images, "bytes")
                captions = batch.column(self.caption_column).to_pylist()
                labels = (batch.column(self.label_column).to_pylist() if self.label_column
                          else [None] * batch.num_rows)
                for image, caption, label in zip(images.to_pylist(), captions, labels):
                    row_key = f"{unit['name']}#{row}"
                    yield RawSample(sample_id=stable_id(row_key), key=row_key, image=image, captions=caption,
                                    label=-1 if label is None else int(label))
                    row += 1
        except (pa.ArrowInvalid, OSError, KeyError):
            return
