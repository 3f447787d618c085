"""Finding a source's files on any pyarrow filesystem: a local directory, a single file, a glob, or a URI
(s3://bucket/prefix, gs://..., file:///...). Keys are paths relative to the root, so a row's id does not change
when the data moves between a laptop and a bucket.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

from tim_ray.data.records import DataError

GLOB_CHARS = "*?["


S3_ATTEMPTS = 3  # tries of each S3 request (the AWS standard retry strategy): throttling answers need retries


def resolve(path: str, timeout_s: float | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI. `timeout_s` (data.connect_timeout_s) bounds the
    waits on a remote store: an S3 request waits at most that long to connect and for data and is tried
    S3_ATTEMPTS times (pyarrow's defaults retry an unreachable endpoint for minutes); the hub behind hf:// must
    accept a connection within it (huggingface_hub retries on its own). None: the libraries' defaults."""
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if path.startswith("hf://") and timeout_s is not None:
        from tim_ray.models.hub import hub_offline, hub_reachable

        why = "HF_HUB_OFFLINE is set" if hub_offline() else hub_reachable(timeout_s)
        if why:
            raise DataError(f"cannot open '{path}': {why}")
    try:
        fs, inside = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as exc:  # unknown scheme, missing credentials, bad bucket name, no network
        raise DataError(f"cannot open '{path}': {str(exc).splitlines()[0]}") from None
    if isinstance(fs, pafs.S3FileSystem) and timeout_s is not None:
        # The URI's options (region, endpoint, scheme, ...) as from_uri resolved them, plus the limits.
        options = {**fs.__reduce__()[1][0], "connect_timeout": timeout_s, "request_timeout": timeout_s}
        fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
    return fs, inside


@dataclass(frozen=True)
class FileSet:
    location: str  # what the user gave (re-resolved in each Ray worker: filesystems are cheap to rebuild)
    root: str  # the directory keys are relative to, inside the filesystem
    keys: tuple[str, ...]  # sorted paths relative to root
    sidecars: frozenset[str] = frozenset()  # other files found beside them (e.g. img2dataset's stats)
    timeout_s: float | None = None  # data.connect_timeout_s, for the workers' filesystems too

    def filesystem(self) -> pafs.FileSystem:
        return resolve(self.location, self.timeout_s)[0]

    def full_path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key


def _visible(path: str) -> bool:
    """Skip hidden and bookkeeping files (.DS_Store, _SUCCESS, .ipynb_checkpoints/...)."""
    return not any(part.startswith((".", "_")) for part in path.split("/"))


def _listing(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    return [info.path for info in infos if info.type == pafs.FileType.File]


def list_files(location: str, extensions: tuple[str, ...], sidecars: tuple[str, ...] = (),
               timeout_s: float | None = None) -> FileSet:
    """The files under `location` (directory, file or glob) whose names end in one of `extensions`, and those
    ending in one of `sidecars` (listed in the same pass). A store that cannot be reached or read is a DataError."""
    fs, path = resolve(location, timeout_s)
    try:
        root, paths = _find(fs, path, location)
    except OSError as exc:  # pyarrow's S3/GCS errors: unreachable, timed out, access denied
        raise DataError(f"cannot list '{location}': {str(exc).splitlines()[0]}") from None
    relative = sorted(p[len(root):].lstrip("/") for p in paths)
    keys = [k for k in relative if _visible(k) and k.lower().endswith(tuple(f".{e}" for e in extensions))]
    if not keys:
        raise DataError(f"no {'/'.join(extensions)} files found at data.path '{location}'")
    extra = frozenset(k for k in relative if sidecars and k.endswith(sidecars))
    return FileSet(location=location, root=root, keys=tuple(keys), sidecars=extra, timeout_s=timeout_s)


def _find(fs: pafs.FileSystem, path: str, location: str) -> tuple[str, list[str]]:
    """(the root keys are relative to, the paths of the files) for a directory, file or glob."""
    if any(c in path for c in GLOB_CHARS):
        parts = path.split("/")
        first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        root = "/".join(parts[:first_glob])
        return root, [p for p in _listing(fs, root) if fnmatch.fnmatchcase(p, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.path '{location}' does not exist")
    root = path.rsplit("/", 1)[0] if info.type == pafs.FileType.File else path.rstrip("/")
    return root, [path] if info.type == pafs.FileType.File else _listing(fs, root)


class FileSource:
    """What the file sources (parquet, webdataset, folder) share as data sets: a path, RGB, no classes or metric
    of their own (labels in the files are the user's)."""

    needs_path = True
    grey = False
    num_classes = None
    metrics = ()

    @staticmethod
    def check(cfg) -> None:
        if not cfg.data.path and not cfg.data.precomputed:
            raise DataError(f"data.source = '{cfg.data.source}' needs data.path (a directory, glob or URI)")
