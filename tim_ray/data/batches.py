"""What training calls: load the data once, then iterate one rank's batches of an epoch from any position."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tim_ray.data.clean import CleanSet, load_clean
from tim_ray.data.encode import EncoderSpec
from tim_ray.data.geometry import PIXEL_CODEC, pixel_channels
from tim_ray.data.order import epoch_batches, rank_slice
from tim_ray.data.precompute import PrecomputedSet, load_precomputed, read_manifest

TrainingData = CleanSet | PrecomputedSet


def load_training_data(cfg, run_dir: str | Path, encoders: EncoderSpec | None = None) -> TrainingData:
    """The precomputed shards of data.precomputed, else the cleaned source (its rejects written to
    data.rejects_file under `run_dir`). Call once on the driver; the result pickles (ray.put it for the workers)."""
    if cfg.data.precomputed:
        return load_precomputed(cfg)
    return load_clean(cfg, Path(run_dir) / cfg.data.rejects_file, encoders)


def rank_batches(data: TrainingData, seed: int, epoch: int, start_sample: int, global_batch: int | None, rank: int,
                 world: int, drop_last: bool = True) -> Iterator[dict]:
    """Rank `rank` of `world`'s batches for the rest of `epoch`, after its first `start_sample` samples.

    Every rank gets one batch per global batch, so all ranks run the same number of steps; the batch sizes of one
    step differ by at most one between ranks. global_batch: rows per step for fixed-size data (a multiple of
    world); None for bucketed data, whose steps are sized by data.bucket_token_budget. Raises ValueError before
    yielding anything if a batch would leave a rank empty or start_sample is not a step boundary.
    """
    if global_batch is not None and global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world}")
    batches = epoch_batches(data.buckets, data.bucket_batch_sizes, seed, epoch, start_sample, global_batch, drop_last)
    groups = [rank_slice(batch, rank, world) for batch in batches]
    return data.local_batches(groups, seed, epoch)


def image_channels(cfg) -> int:
    """Channels of batch["image"] for this config (the model's in_channels): the precomputed shards' shape, else
    the pixel channels (1 for Fashion-MNIST, 3 otherwise) in pixel space, else the codec's latent channels."""
    if cfg.data.precomputed:
        return read_manifest(Path(cfg.data.precomputed))["buckets"][0]["image_shape"][0]
    if cfg.model.codec == PIXEL_CODEC:
        return pixel_channels(cfg)
    spec = EncoderSpec.of(cfg)
    return spec.load_codec(spec.codec, spec.codec_kind, spec.sample_posterior, "cpu").channels

