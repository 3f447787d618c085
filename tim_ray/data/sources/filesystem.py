"""Finding a source's files on any pyarrow filesystem: a local directory, a single file, a glob, or a URI
(s3://bucket/prefix, gs://..., file:///...). Keys are paths relative to the root, so a row's id does not change
when the data moves between a laptop and a bucket.
"""
from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import pyarrow.fs as pafs

from tim_ray.data.records import DataError, StoreUnreachable

GLOB_CHARS = "*?["


S3_ATTEMPTS = 3  # tries of each S3 request (the AWS standard retry strategy): throttling answers need retries
# Words in pyarrow's S3/GCS errors that mean the store was not reached (DNS, refused, timed out), not a refusal
# by a store that answered (access denied, no such bucket).
UNREACHABLE_MARKERS = ("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "Couldn't connect",
                       "Couldn't resolve", "Timeout was reached", "timed out", "DEADLINE_EXCEEDED", "UNAVAILABLE",
                       "Connection refused")


def s3_attempt_timeout(timeout_s: float) -> float:
    """Seconds each of an S3 request's S3_ATTEMPTS tries may wait to connect or for data, so that the tries
    together stay near `timeout_s` (curl counts a stalled read in whole seconds: at least 1)."""
    return max(1.0, timeout_s / S3_ATTEMPTS)


def resolve(path: str, timeout_s: float | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI, with `timeout_s` (data.connect_timeout_s) set as
    the limits of each later request: an S3 request's S3_ATTEMPTS tries wait s3_attempt_timeout(timeout_s) each
    to connect or for data (pyarrow's defaults retry an unreachable endpoint for minutes); GCS retries transient
    errors for at most timeout_s (a single stalled GCS request is not bounded by pyarrow: `list_files` bounds the
    first contact as a whole). The hub behind hf:// must accept a connection within timeout_s. None: the
    libraries' defaults. Resolving an s3:// URI without region= or endpoint_override= asks AWS for the bucket's
    region (a request pyarrow does not time)."""
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if path.startswith("hf://") and timeout_s is not None:
        from tim_ray.models.hub import hub_offline, hub_reachable

        if hub_offline():
            raise DataError(f"cannot open '{path}': HF_HUB_OFFLINE is set")
        if why := hub_reachable(timeout_s):
            raise StoreUnreachable(f"cannot open '{path}': {why}")
    try:
        fs, inside = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as exc:  # unknown scheme, missing credentials, bad bucket name, no network
        raise _store_error("open", path, exc) from None
    if timeout_s is None:
        return fs, inside
    # The URI's options (region, endpoint, scheme, ...) as from_uri resolved them, plus the limits.
    options = fs.__reduce__()[1][0]
    if isinstance(fs, pafs.S3FileSystem):
        per_try = s3_attempt_timeout(timeout_s)
        fs = pafs.S3FileSystem(**{**options, "connect_timeout": per_try, "request_timeout": per_try},
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
    elif isinstance(fs, pafs.GcsFileSystem):
        fs = pafs.GcsFileSystem(**{**options, "retry_time_limit": timedelta(seconds=timeout_s)})
    return fs, inside


def _store_error(what: str, location: str, exc: BaseException) -> Exception:
    """One line naming `location`: StoreUnreachable (exit 1) when the store was not reached, else a DataError."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    kind = StoreUnreachable if any(m in str(exc) for m in UNREACHABLE_MARKERS) else DataError
    return kind(f"cannot {what} '{location}': {first}")


def _within(timeout_s: float | None, location: str, work):
    """work(), or StoreUnreachable when it has not returned after `timeout_s` seconds. The work runs in a daemon
    thread that is left behind when it overruns (pyarrow cannot cancel a request): the command fails at once; the
    request itself ends by its own limits (resolve's), which on S3 also bound how long the process takes to exit
    (pyarrow finishes its S3 requests before it exits)."""
    if timeout_s is None:
        return work()
    done: dict = {}

    def run() -> None:
        try:
            done["value"] = work()
        except BaseException as exc:  # noqa: BLE001  re-raised in the caller's thread
            done["error"] = exc

    thread = threading.Thread(target=run, name="tim-ray-store-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StoreUnreachable(f"cannot reach '{location}' within {timeout_s:g} s "
                               f"(data.connect_timeout_s)")
    if "error" in done:
        raise done["error"]
    return done["value"]


@dataclass(frozen=True)
class FileSet:
    location: str  # what the user gave
    # The filesystem as the first contact resolved it, with its limits and an S3 bucket's region: pickled to the
    # Ray workers as its options, so no read repeats the region lookup (untimed by pyarrow) that resolving the
    # URI again would make.
    fs: pafs.FileSystem = field(compare=False)
    root: str  # the directory keys are relative to, inside the filesystem
    keys: tuple[str, ...]  # sorted paths relative to root
    sidecars: frozenset[str] = frozenset()  # other files found beside them (e.g. img2dataset's stats)

    def filesystem(self) -> pafs.FileSystem:
        return self.fs

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
    ending in one of `sidecars` (listed in the same pass). The whole first contact (resolving the URI, an S3
    bucket's region lookup, the listing) waits at most `timeout_s` seconds: a store that cannot be reached or does
    not answer in that time is StoreUnreachable (exit 1), one that answers with a refusal a DataError (exit 2)."""
    fs, root, paths = _within(timeout_s, location, lambda: _resolve_and_find(location, timeout_s))
    relative = sorted(p[len(root):].lstrip("/") for p in paths)
    keys = [k for k in relative if _visible(k) and k.lower().endswith(tuple(f".{e}" for e in extensions))]
    if not keys:
        raise DataError(f"no {'/'.join(extensions)} files found at data.path '{location}'")
    extra = frozenset(k for k in relative if sidecars and k.endswith(sidecars))
    return FileSet(location=location, fs=fs, root=root, keys=tuple(keys), sidecars=extra)


def _resolve_and_find(location: str, timeout_s: float | None) -> tuple[pafs.FileSystem, str, list[str]]:
    """The first contact with a store (an S3 bucket's region lookup included), bounded as a whole by list_files."""
    fs, path = resolve(location, timeout_s)
    try:
        return fs, *_find(fs, path, location)
    except OSError as exc:  # pyarrow's S3/GCS errors: unreachable, timed out, access denied
        raise _store_error("list", location, exc) from None


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
