"""Ray Data input pipeline: image-text pairs streamed, cleaned, bucketed, encoded; precompute.

Flow:
    source (fashion-mnist | shapes | parquet | webdataset | folder; data.source)
      -> Ray Data: one read task per unit (file, shard, row range); decode + validate + resize/crop per row in our own
         map step; unusable rows become reject records (counted by reason, written to the rejects file)
      -> CleanSet: the good rows in memory, uint8 at their bucket size, sorted by sample id
      -> per epoch and rank: order (seed, epoch) -> this rank's slice of each global batch -> Ray Data: gather +
         caption pick + caption dropout + flip -> text-encoder actor pool -> latent-codec actor pool -> batches
    or `run_precompute` encodes every row once into parquet shards; PrecomputedSet serves batches without Ray.

Batch format (one dict per step and rank, from `rank_batches`):
    "image"      float32 (B, C, H, W): pixels in [-1, 1] (pixel codec; Fashion-MNIST has C = 1) or codec latents
    "text"       float32 (B, L, D): text-encoder features, L = model.max_text_tokens (zero-padded);
                 (B, 0, 0) for class conditioning
    "text_mask"  bool (B, L): True = a real token; (B, 0) for class conditioning
    "label"      int64 (B,): class id, or -1 where the source has none
    "sample_id"  int64 (B,): stable global id of the source row (built-ins: the row index; file sources: a hash
                 of the file path relative to the source root and the row's place in the file)
All rows of a batch share one bucket (one H x W). A dropped caption (data.caption_dropout) is the encoding of "".

Use: `data = load_training_data(cfg, run_dir)` once on the driver (cleaned source or precomputed shards; then
`data.reject_counts()` for the log and MLflow), `ray.put` it, and in each worker iterate
`rank_batches(data, seed, epoch, start_sample, global_batch, rank, world)`. `image_channels(cfg)` is the
network's in_channels; `check_encoders` loads and tries the encoders in a Ray task (one-line errors, the text
width D); `run_precompute(cfg, out_dir)` backs `tim-ray precompute`.

Exact resume (see order.py): the sample order is a pure function of (train seed, epoch, position). Training keeps
(epoch, samples consumed in the epoch) in its checkpoint and resumes with
    rank_batches(data, seed, epoch, start_sample=consumed, global_batch, rank, world)
which skips exactly the consumed samples; at another world size the remaining samples still come exactly once.
Caption picks, dropout and flips are keyed by (seed, epoch, sample id), and each encoder call sees exactly one
rank batch, so a resumed run sees the same inputs as an uninterrupted one.

What scales and what does not:
- Reading and cleaning run in parallel Ray tasks over any number of files on any pyarrow filesystem, but the
  cleaned rows (uint8 at training size) are collected into memory: meant for sets up to a few GB of pixels
  (Fashion-MNIST: 60 MB; shapes: 3 KB per row at 32x32). Load once on the driver and ray.put the result.
- On-the-fly encoding runs one Ray Data pipeline per rank and epoch, with its own encoder actors (data.encode_*,
  GPUs per actor when data.encode_gpus > 0); it re-encodes every epoch.
- Precomputed shards are read fully into memory: rows x (latent + L x D x 4 bytes of text features).
- Not built: a streaming (never materialised) path for web-scale sets, and its resumable order.
"""
from tim_ray.data.batches import image_channels, load_training_data, rank_batches
from tim_ray.data.clean import CleanSet, clean_dataset, load_clean
from tim_ray.data.encode import EncoderSpec, check_encoders
from tim_ray.data.order import epoch_batches, epoch_order
from tim_ray.data.precompute import PrecomputedSet, load_precomputed, run_precompute
from tim_ray.data.records import REJECT_REASONS, DataError

__all__ = [
    "CleanSet", "DataError", "EncoderSpec", "PrecomputedSet", "REJECT_REASONS", "check_encoders", "clean_dataset",
    "epoch_batches", "epoch_order", "image_channels", "load_clean", "load_precomputed", "load_training_data",
    "rank_batches", "run_precompute",
]
