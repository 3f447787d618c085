"""A training run's checkpoints through Ray Train: each rank's DCP files (tim_ray.artifacts.checkpoint) reported
to Ray, which merges them into one checkpoint_<step> directory of the run with the checksum manifests copied last;
the launch that wrote them, and where Ray keeps them. Which one a (re)starting worker group loads is decided on rank
0 (tim_ray.artifacts.checkpoints_on_disk.resume_point) and shared with every rank (from_rank_zero).
"""
from __future__ import annotations

import functools
import os
import tempfile

import torch
import torch.distributed as dist

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import TrainState, save_checkpoint


def report_with_checkpoint(metrics: dict, model, optimizer, ema, state: TrainState, config: dict, rank: int) -> None:
    """Save this rank's shard into a temp dir and hand it to Ray, which merges all ranks into one checkpoint. The
    rank's checksum manifest is held back and copied in after its other files (_persist_manifest_last)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="tim-ckpt-") as tmp:
        directory = os.path.join(tmp, "files")
        os.mkdir(directory)
        save_checkpoint(directory, model, optimizer, ema, state, config, rank)
        manifest = os.path.join(tmp, checksums.rank_manifest_name(rank))
        os.replace(os.path.join(directory, checksums.rank_manifest_name(rank)), manifest)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=_new_dir_name(state.step) if rank == 0 else f"checkpoint_{state.step:08d}",
                         checkpoint_upload_fn=functools.partial(_persist_manifest_last, manifest))


def _new_dir_name(step: int) -> str:
    """checkpoint_<step>, or checkpoint_<step>-<n> when a directory of that name is already in storage (a run that
    fell back past a damaged checkpoint redoes its step): a checkpoint never writes into another one's files, and
    Ray's retention never deletes a new checkpoint under an old one's name. Ray uses rank 0's name for all ranks."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    name, n = f"checkpoint_{step:08d}", 1
    while storage.storage_filesystem.get_file_info(f"{storage.experiment_fs_path}/{name}").type \
            != pyarrow.fs.FileType.NotFound:
        n += 1
        name = f"checkpoint_{step:08d}-{n}"
    return name


def _persist_manifest_last(manifest: str, checkpoint, checkpoint_dir_name: str):
    """Ray's own copy of this rank's files into the checkpoint directory, then the rank's manifest: written under a
    temporary name and renamed, so a manifest in storage means every file it lists was copied before it."""
    import ray.train

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    fs, name = persisted.filesystem, os.path.basename(manifest)
    partial = f"{persisted.path}/.tim-ray-{name}.part"
    with open(manifest, "rb") as f, fs.open_output_stream(partial) as out:
        out.write(f.read())
    fs.move(partial, f"{persisted.path}/{name}")
    return persisted


def launch_id() -> str | None:
    """The id Ray Train gives one TorchTrainer run (one `tim-ray train`): the same in every worker group that run
    starts, restarts after a failure or a resize included, and new on the next launch. Ray 2.60 has no public
    accessor, so it is read from Ray's internal train context; None when that is not there."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().train_run_context.run_id
    except (ImportError, AttributeError, RuntimeError):
        return None


def local_run_storage() -> str | None:
    """The directory where Ray Train persists this run's checkpoints, when storage is a local (or mounted) path;
    None for remote storage (s3://, gs://), where the run's directories cannot be listed and checked in place."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    return storage.experiment_fs_path


def from_rank_zero(value, device: torch.device | None = None):
    """Rank 0's `value` on every rank (a picklable object), so that all ranks act on one decision."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device is not None and device.type != "cpu" else None)
    return box[0]
