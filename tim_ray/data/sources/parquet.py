"""Parquet files of image bytes and captions (a local path, a glob or a pyarrow URI such as s3://bucket/prefix).

Columns are found by name: the image in one of IMAGE_COLUMNS (binary, or a Hugging Face struct with a `bytes`
field), the caption(s) in one of CAPTION_COLUMNS (string, binary or a list of strings), an optional int `label`.
A row's key is "<file relative to the root>#<row number in the file>".
"""
from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tim_ray.data.records import UNREADABLE_FILE, DataError, RawSample, stable_id
from tim_ray.data.sources.filesystem import FileSet, list_files

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")
CAPTION_COLUMNS = ("captions", "caption", "text", "txt")
LABEL_COLUMN = "label"
ROWS_PER_READ = 256


def _pick(names: list[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{where} has no {what} column (looked for {', '.join(candidates)}; it has {', '.join(names)})")


class ParquetSource:
    name = "parquet"

    def __init__(self, path: str):
        self.files: FileSet = list_files(path, ("parquet",))
        first = self.files.full_path(self.files.keys[0])
        try:
            schema = pq.read_schema(self.files.filesystem().open_input_file(first))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"cannot read the schema of '{first}': {str(exc).splitlines()[0]}") from None
        self.image_column = _pick(schema.names, IMAGE_COLUMNS, "image", first)
        self.caption_column = _pick(schema.names, CAPTION_COLUMNS, "caption", first)
        self.label_column = LABEL_COLUMN if LABEL_COLUMN in schema.names else None

    def units(self) -> list[str]:
        return list(self.files.keys)

    def _batches(self, key: str) -> Iterator[pa.RecordBatch]:
        handle = self.files.filesystem().open_input_file(self.files.full_path(key))
        columns = [c for c in (self.image_column, self.caption_column, self.label_column) if c]
        yield from pq.ParquetFile(handle).iter_batches(batch_size=ROWS_PER_READ, columns=columns)

    def read(self, key: str) -> Iterator[RawSample]:
        """Every row of one file. A file that cannot be read (no footer, missing columns, cut short) yields one
        `unreadable_file` record after the rows read before the failure."""
        row = 0
        try:
            for batch in self._batches(key):
                images = batch.column(self.image_column)
                if pa.types.is_struct(images.type):
                    images = pc.struct_field(images, "bytes")
                captions = batch.column(self.caption_column).to_pylist()
                labels = (batch.column(self.label_column).to_pylist() if self.label_column
                          else [None] * batch.num_rows)
                for image, caption, label in zip(images.to_pylist(), captions, labels):
                    row_key = f"{key}#{row}"
                    yield RawSample(sample_id=stable_id(row_key), key=row_key, image=image, captions=caption,
                                    label=-1 if label is None else int(label))
                    row += 1
        except (pa.ArrowInvalid, OSError, KeyError):
            yield RawSample(sample_id=stable_id(key), key=key, image=None, captions=None, reject=UNREADABLE_FILE)
