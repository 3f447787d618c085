"""Ray Data input pipeline: image-text pairs streamed, cleaned, bucketed, encoded; precompute.

Flow (nothing is held per row of the data set, anywhere):
    source (fashion-mnist | shapes | parquet | webdataset | folder; data.source), or precomputed shards
      -> metadata only, on the driver: the units (parquet row groups, tar shards, row ranges) and their row counts
      -> per epoch, a pure function of (seed, epoch): units permuted, cut into shuffle windows of about
         data.shuffle_window rows, rows permuted inside each window (order.py)
      -> WindowCache actor: each window read once by a Ray task for all ranks, a few kept in the object store
      -> per rank, Ray Data: this rank's share of each global batch taken from the windows, decoded, validated,
         resized/cropped (unusable rows become reject records, counted by reason), caption pick + caption dropout +
         flip -> text-encoder actor pool -> latent-codec actor pool -> batches
    or `run_precompute` streams every row once into parquet shards (resumable); training reads those shards the
    same way, with flips and caption dropout applied per epoch.

Batch format (one dict per step and rank, from `rank_batches`):
    "image"      float32 (B, C, H, W): pixels in [-1, 1] (pixel codec; Fashion-MNIST has C = 1) or codec latents
    "text"       float32 (B, L, D): text-encoder features, L = model.max_text_tokens (zero-padded);
                 (B, 0, 0) for class conditioning
    "text_mask"  bool (B, L): True = a real token; (B, 0) for class conditioning
    "label"      int64 (B,): class id, or -1 where the source has none
    "sample_id"  int64 (B,): stable global id of the source row (built-ins: the row index; file sources: a hash
                 of the file path relative to the source root and the row's place in the file)
All rows of a batch share one bucket (one H x W). A dropped caption (data.caption_dropout) is the encoding of "".
B is the rank's share of the global batch less its rejected rows; it can be 0.

Use: `data = open_training_data(cfg)` once on the driver (small: units and counts), pass it to the workers, make
one `window_cache(data)` actor shared by the ranks, and in each worker iterate
`rank_batches(data, epoch, start_sample, global_batch, rank, world, cache)` for (batch, plan): plan.after is the
epoch position after the batch, plan.rejects its rejected rows.

Exact resume (see order.py): the sample order is a pure function of (train seed, epoch, position). Training keeps
(epoch, samples consumed in the epoch) in its checkpoint and resumes there, one window read away; at another world
size the remaining samples still come exactly once. Caption picks, dropout and flips are keyed by (seed, epoch,
sample id), and each encoder call sees exactly one rank batch, so a resumed run sees the same inputs.
"""
from tim_ray.data.batches import StreamingData, image_channels, open_training_data, rank_batches, window_cache
from tim_ray.data.encode import EncoderSpec, check_encoders
from tim_ray.data.precompute import open_precomputed, prepare_precompute, run_precompute
from tim_ray.data.records import REJECT_REASONS, DataError

__all__ = [
    "DataError", "EncoderSpec", "REJECT_REASONS", "StreamingData", "check_encoders", "image_channels",
    "open_precomputed", "open_training_data", "prepare_precompute", "rank_batches", "run_precompute",
    "window_cache",
]
