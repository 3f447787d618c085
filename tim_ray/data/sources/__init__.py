"""Sources by name (data.source): one class per file owns everything tim-ray knows about a kind of data set.

A source class has `name`; `check(cfg)` (its own settings, a DataError naming the bad one); `needs_path`; `grey`
(one channel in pixel space); `num_classes` (None: not a class data set); `metrics` (the eval metrics that score
samples against it); and, opened, `units()` (JSON-able work items in a fixed order, each with its `name` and its
row count `rows`, known from metadata before any row is read), `read(unit)` (the unit's rows as RawSample, in a
fixed order) and optionally `prompts()` (its sample-grid prompts; else the first captions of the data). Adding a
source is one new file and its line in SOURCES."""
from __future__ import annotations

from tim_ray.data.geometry import Geometry
from tim_ray.data.records import DataError
from tim_ray.data.sources.fashion_mnist import FashionMnistSource
from tim_ray.data.sources.folder import FolderSource
from tim_ray.data.sources.parquet import ParquetSource
from tim_ray.data.sources.shapes import ShapesSource
from tim_ray.data.sources.webdataset import WebDatasetSource

SOURCES = {source.name: source for source in (FashionMnistSource, ShapesSource, ParquetSource, WebDatasetSource,
                                               FolderSource)}


def source_class(name: str):
    if name not in SOURCES:
        raise DataError(f"data.source = {name!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[name]


def check_source(cfg) -> None:
    """The source's own checks of the config (called by config validation)."""
    source_class(cfg.data.source).check(cfg)


def check_metric(cfg, metric: str, what: str) -> None:
    """`metric` scores samples against data.source's set: a DataError naming the sources it applies to."""
    if metric not in source_class(cfg.data.source).metrics:
        owners = " or ".join(name for name, source in SOURCES.items() if metric in source.metrics) or "no"
        raise DataError(f"{what} {metric} scores samples against {owners} data, but data.source is "
                        f"'{cfg.data.source}'")


def open_source(cfg, geometry: Geometry):
    """The source data.source names, with its files listed (a DataError if there are none)."""
    d = cfg.data
    source = source_class(d.source)
    if source is FashionMnistSource:
        return FashionMnistSource(d.path, d.split)
    if source is ShapesSource:
        return ShapesSource(d.seed, geometry.sizes, d.max_samples)
    if source is ParquetSource:
        return ParquetSource(d.path, d.image_column, d.caption_column, d.connect_timeout_s)
    return source(d.path, d.connect_timeout_s)


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
