"""Distributed checkpoints (torch.distributed.checkpoint): the files every rank writes, and reading them back.

A checkpoint directory holds:
  dcp/          model, optimizer and EMA shards of every rank (DCP reshards them on load, so the world size may change)
  state.json    step, data position, world size, the resolved config, library versions, the MLflow run id
  checksums.rank<r>.json   size and sha256 of every file rank r wrote (tim_ray.artifacts.checksums), written last

Training hands each rank's files to Ray Train (tim_ray.train.ray_checkpoints), which merges them into one
checkpoint directory. Every load verifies the checksums first: a changed, truncated or missing file is a one-line
CheckpointError that names it. Which checkpoint a run continues from, or sample/eval/export use, is decided in
tim_ray.artifacts.checkpoints_on_disk.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import io
import json
import os
import pickle
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checksums import CheckpointError  # noqa: F401 (defined there, raised by every loader)

STATE_FILE = "state.json"
DCP_DIR = "dcp"
INDEX_FILE = ".metadata"  # DCP's index of the shards, a pickle


@dataclass
class TrainState:
    """Where training stands. The data position is (epoch, epoch_samples: samples of that epoch consumed);
    samples_seen counts all samples since the start."""

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    samples_seen: int = 0
    world_size: int = 1
    epoch_rejects: dict[str, int] = field(default_factory=dict)  # rejected rows of this epoch so far, all ranks
    mlflow_run_id: str | None = None
    launch: str | None = None  # the Ray Train run (one `tim-ray train`) that wrote it (train.ray_checkpoints.launch_id)


def versions() -> dict[str, str]:
    out = {}
    for package in ("tim-ray", "torch", "ray"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def _alone() -> bool:
    """True when this process is the whole world, so DCP needs no collectives.

    DCP gathers every rank's save plan (hundreds of items, a few hundred KB) with gloo even at world size 1. Gloo
    copies it on its own worker thread with an OpenMP parallel loop, and that thread's OpenMP team lives as long as
    the process group: libgomp then counts more threads than cores and stops spin-waiting, so every later training
    step on the CPU ran about 1.2x slower (measured: docs/training.md)."""
    return not dist.is_initialized() or dist.get_world_size() == 1


@contextlib.contextmanager
def _single_process_intended():
    """DCP warns on every no_dist call that it is 'assuming' a single process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(directory: str, model, optimizer, ema, state: TrainState, config: dict, rank: int) -> None:
    """Every rank calls this with its own (empty) directory; rank 0 also writes state.json. Last, each rank writes
    the checksum manifest of its own files, checksums.rank<rank>.json (part `rank` of the world size)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        payload["ema"] = ema.state_dict()
    with _single_process_intended():
        dcp.save(payload, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=_alone())
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump({"state": asdict(state), "config": config, "versions": versions()}, f, indent=1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    checksums.seal(directory, checksums.rank_manifest_name(rank), part=rank, parts=world)


def read_state(directory: str) -> tuple[TrainState, dict]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(directory, DCP_DIR)):
        raise CheckpointError(f"{directory} is not a tim-ray checkpoint (no {STATE_FILE} or {DCP_DIR}/)")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return TrainState(**saved["state"]), saved["config"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); resume from an earlier checkpoint") from None


@functools.lru_cache(maxsize=1)
def _dcp_metadata_classes() -> dict[tuple[str, str], object]:
    """Everything a DCP index may name: the metadata dataclasses, torch.Size, dtypes, layouts and paths."""
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    from torch.serialization import _get_layout

    allowed = {("torch.distributed.checkpoint.metadata", name): obj for name, obj in vars(dcp_md).items()
               if isinstance(obj, type) and obj.__module__ == dcp_md.__name__}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = _get_layout  # maps a layout's name to torch.strided etc.
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _dcp_metadata_classes()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return allowed[(module, name)]


def read_index(directory: str):
    """The DCP index of a checkpoint, unpickled admitting only DCP's metadata classes: torch.distributed.checkpoint
    itself would run whatever a crafted index names. Raises CheckpointError."""
    index = os.path.join(directory, DCP_DIR, INDEX_FILE)
    try:
        with open(index, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        metadata.state_dict_metadata  # an index without it is not DCP's: AttributeError below
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{index} is not a readable DCP index ({exc})") from None
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor entries (the optimizer's param_groups) are read with
    torch.load(weights_only=True) instead of a full unpickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper for this

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _safe_load(payload: dict, directory: str, **kwargs) -> None:
    read_index(directory)
    with _single_process_intended():
        dcp.load(payload, checkpoint_id=os.path.join(directory, DCP_DIR), planner=SafeLoadPlanner(), **kwargs)


# CheckpointException (a BaseException) is how DCP reports a failure on any rank: damaged or missing shard files.
LOAD_ERRORS = (CheckpointException, RuntimeError, ValueError, OSError)


def _reason(exc: BaseException) -> str:
    """One line: the first failing rank's own error inside a CheckpointException, else the error itself."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}{': ' + lines[0] if lines else ''}"
    return (f"{detail} (its files match their checksums, so it does not fit this model and config, or a file "
            f"changed after it was verified; start from another checkpoint with --resume PATH)")


def load_checkpoint(directory: str, model, optimizer, ema, verify: bool = True) -> TrainState:
    """Load model, optimizer and EMA (resharding to the current world size) and return where training stands.
    The checksums are verified first unless `verify` is False (the caller, e.g. rank 0 for all, just did)."""
    if verify:
        checksums.verify(directory)
    state, _ = read_state(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        payload["ema"] = ema.state_dict()
    try:
        _safe_load(payload, directory, no_dist=_alone())
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot load {directory}: {_reason(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
    if ema is not None:
        ema.load_state_dict(payload["ema"])
    return state


def load_weights(directory: str, model, use_ema: bool = False) -> TrainState:
    """Load the trained (or EMA) weights of a checkpoint into an unsharded `model` in this one process, whatever
    world size wrote it: for sampling, evaluation and export. Verifies the checksums first."""
    checksums.verify(directory)
    state, _ = read_state(directory)
    key = "ema" if use_ema else "model"
    weights = {name: p.detach().clone() for name, p in model.named_parameters()} if use_ema else model.state_dict()
    try:
        _safe_load({key: weights}, directory, no_dist=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"cannot load the {key} weights of {directory}: {_reason(exc)}") from None
    model.load_state_dict(weights, strict=not use_ema)
    return state
