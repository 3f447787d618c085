"""Sources by name (data.source). Each has `name`, `units()` (small JSON-able work items in a fixed order; one Ray
read task each) and `read(unit)` (the unit's rows as RawSample, in a fixed order)."""
from __future__ import annotations

from tim_ray.data.geometry import Geometry
from tim_ray.data.records import DataError
from tim_ray.data.sources.fashion_mnist import FashionMnistSource
from tim_ray.data.sources.folder import FolderSource
from tim_ray.data.sources.parquet import ParquetSource
from tim_ray.data.sources.shapes import ShapesSource
from tim_ray.data.sources.webdataset import WebDatasetSource

FILE_SOURCES = {"parquet": ParquetSource, "webdataset": WebDatasetSource, "folder": FolderSource}


def open_source(cfg, geometry: Geometry):
    """The source data.source names, with its files listed (a DataError if there are none)."""
    d = cfg.data
    if d.source == "fashion-mnist":
        return FashionMnistSource(d.path, d.split, d.max_samples)
    if d.source == "shapes":
        return ShapesSource(d.seed, geometry.sizes, d.max_samples)
    if d.source in FILE_SOURCES:
        if not d.path:
            raise DataError(f"data.source = '{d.source}' needs data.path (a directory, glob or URI)")
        return FILE_SOURCES[d.source](d.path)
    raise DataError(f"unknown data.source '{d.source}'")
