"""What training calls: open the data (metadata only) once on the driver, then stream one rank's batches of an
epoch from any position."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tim_ray.data.encode import EncoderSpec
from tim_ray.data.geometry import PIXEL_CODEC, Geometry, Limits, pixel_channels
from tim_ray.data.order import EpochLayout, epoch_layout
from tim_ray.data.records import DataError
from tim_ray.data.sources import first_rows, open_source
from tim_ray.data.windows import raw_row, unit_samples

GRID_PROMPTS = 8  # columns of a sample grid made from the data's own captions
PROMPT_UNITS = 4  # units searched for them


@dataclass
class StreamingData:
    """A data set as training needs it: its source and the row counts of its units, nothing per row. Small and
    picklable: the driver builds it (`open_training_data`) and hands it to every worker.

    source: a source of tim_ray.data.sources, or a PrecomputedSource (precomputed=True: rows already encoded).
    units: the source's units in source order, each with its row count.
    """

    source: object
    units: list[dict]
    seed: int  # the order's seed (train.seed)
    window_rows: int
    geometry: Geometry
    limits: Limits
    bucket_batch_sizes: np.ndarray | None  # rows per global batch of each bucket; None: fixed size
    hflip: bool
    caption_dropout: float
    encoders: EncoderSpec | None  # None for precomputed rows
    decode_tasks: int
    window_cache: int
    precomputed: bool = False
    null_text: tuple[np.ndarray, np.ndarray] | None = None  # precomputed: the stored encoding of ""
    manifest: dict = field(default_factory=dict)  # precomputed: the manifest

    @functools.cached_property
    def unit_rows(self) -> np.ndarray:
        return np.array([unit["rows"] for unit in self.units], dtype=np.int64)

    @property
    def num_rows(self) -> int:
        """Source rows (rejects included: they are found only as the rows stream)."""
        return int(self.unit_rows.sum())

    def layout(self, epoch: int) -> EpochLayout:
        return epoch_layout(self.unit_rows, self.seed, epoch, self.window_rows)

    def prompts(self, count: int = GRID_PROMPTS) -> list[str]:
        """Prompts for sample grids: the source's own (one per Fashion-MNIST class), else the first distinct
        captions of its first units."""
        if hasattr(self.source, "prompts"):
            return self.source.prompts()
        seen: list[str] = []
        for unit in self.units[:PROMPT_UNITS]:
            if self.precomputed:
                captions = [[c] for c in self.source.read_rows([unit])["caption"].to_pylist()]
            else:
                captions = [raw_row(sample, self.geometry)["captions"] for sample in unit_samples(self.source, unit)]
            for options in captions:
                if options and options[0] and options[0] not in seen:
                    seen.append(options[0])
                if len(seen) == count:
                    return seen
        return seen or [""]

    def describe(self) -> str:
        windows = self.layout(0).num_windows
        kind = "precomputed rows" if self.precomputed else "source rows"
        return (f"{self.num_rows} {kind} in {len(self.units)} units, {windows} shuffle windows of about "
                f"{self.window_rows} rows")


def open_training_data(cfg, encoders: EncoderSpec | None = None) -> StreamingData:
    """The precomputed shards of data.precomputed, else the configured source: listed and counted from metadata
    (file listings, parquet footers, shard stats), nothing decoded. `encoders` overrides the config's (tests)."""
    d = cfg.data
    geometry = Geometry.of(cfg)
    common = {"seed": cfg.train.seed, "window_rows": d.shuffle_window, "geometry": geometry,
              "limits": Limits.of(cfg), "bucket_batch_sizes": geometry.global_batches(d.bucket_token_budget),
              "hflip": d.hflip, "caption_dropout": d.caption_dropout, "decode_tasks": d.decode_tasks,
              "window_cache": d.window_cache}
    if d.precomputed:
        from tim_ray.data.precompute import open_precomputed

        source = open_precomputed(cfg)
        return StreamingData(source=source, units=first_rows(source.units(), d.max_samples), encoders=None,
                             precomputed=True, null_text=source.null_text, manifest=source.manifest, **common)
    source = open_source(cfg, geometry)
    units = first_rows(source.units(), d.max_samples)
    if not units:
        raise DataError(f"data.source '{d.source}' at '{d.path}' has no rows")
    return StreamingData(source=source, units=units, encoders=encoders or EncoderSpec.of(cfg), **common)


def rank_batches(data: StreamingData, epoch: int, start_sample: int, global_batch: int | None, rank: int,
                 world: int, cache) -> Iterator[tuple[dict, object]]:
    """Rank `rank` of `world`'s (batch, plan) for the rest of `epoch`, after its first `start_sample` samples.

    Every rank gets one batch per global batch, so all ranks run the same number of steps; global_batch: rows per
    step of fixed-size data (a multiple of world); None for bucketed data, whose steps are sized by
    data.bucket_token_budget. A batch may hold fewer rows than planned (rejected rows), even none.
    cache: a WindowCache actor shared by the ranks (`window_cache`)."""
    from tim_ray.data.stream import rank_stream, to_batch

    if global_batch is not None and global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world}")
    for table in rank_stream(data, epoch, start_sample, global_batch, rank, world, cache):
        yield to_batch(table)


def window_cache(data: StreamingData, name: str | None = None):
    """A WindowCache actor for `data` (named, when ranks share it by name)."""
    import ray

    from tim_ray.data.windows import WindowCache

    options = {"name": name, "get_if_exists": True} if name else {}
    return WindowCache.options(scheduling_strategy="DEFAULT", **options).remote([ray.put(data)], data.window_cache)


def image_channels(cfg) -> int:
    """Channels of batch["image"] for this config (the model's in_channels): the precomputed shards' shape, else
    the pixel channels (1 for Fashion-MNIST, 3 otherwise) in pixel space, else the codec's latent channels."""
    if cfg.data.precomputed:
        from tim_ray.data.precompute import read_manifest

        return read_manifest(cfg.data.precomputed)["buckets"][0]["image_shape"][0]
    if cfg.model.codec == PIXEL_CODEC:
        return pixel_channels(cfg)
    spec = EncoderSpec.of(cfg)
    return spec.load_codec(spec.codec, spec.codec_kind, spec.sample_posterior, "cpu").channels
