"""Sources by name (data.source). Each has `name`, `units()` (JSON-able work items in a fixed order, each with its
`name` and its row count `rows`, known from metadata before any row is read) and `read(unit)` (the unit's rows as
RawSample, in a fixed order)."""
from __future__ import annotations

from tim_ray.data.geometry import Geometry
from tim_ray.data.records import DataError
from tim_ray.data.sources.fashion_mnist import FashionMnistSource
from tim_ray.data.sources.folder import FolderSource
from tim_ray.data.sources.parquet import ParquetSource
from tim_ray.data.sources.shapes import ShapesSource
from tim_ray.data.sources.webdataset import WebDatasetSource

FILE_SOURCES = {"parquet": ParquetSource, "webdataset": WebDatasetSource, "folder": FolderSource}
SOURCES = ("fashion-mnist", "shapes", *FILE_SOURCES)


def open_source(cfg, geometry: Geometry):
    """The source data.source names, with its files listed (a DataError if there are none)."""
    d = cfg.data
    if d.source == "fashion-mnist":
        return FashionMnistSource(d.path, d.split)
    if d.source == "shapes":
        return ShapesSource(d.seed, geometry.sizes, d.max_samples)
    if d.source == "parquet":
        return ParquetSource(_path(d), d.image_column, d.caption_column)
    if d.source in FILE_SOURCES:
        return FILE_SOURCES[d.source](_path(d))
    raise DataError(f"unknown data.source '{d.source}' (one of {', '.join(SOURCES)})")


def _path(d) -> str:
    if not d.path:
        raise DataError(f"data.source = '{d.source}' needs data.path (a directory, glob or URI)")
    return d.path


def first_rows(units: list[dict], limit: int) -> list[dict]:
    """The units holding the first `limit` rows in source order, the last one cut short (0: all)."""
    if not limit:
        return units
    kept, left = [], limit
    for unit in units:
        if left <= 0:
            break
        kept.append(unit if unit["rows"] <= left else {**unit, "rows": left})
        left -= unit["rows"]
    return kept
