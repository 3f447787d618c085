"""WebDataset tar shards: members sharing a key ("dir/000123.jpg", "dir/000123.txt") form one sample.

The image is the first member with an image extension; the caption is the `.txt` member, else the `caption`,
`captions` or `text` field of the `.json` member (whose optional int `label` is kept). Read with Python's tarfile
(streaming, any pyarrow filesystem), so a corrupt member is one rejected sample; a shard cut short yields one
`unreadable_file` record per missing sample after the samples before the cut. A row's key is
"<shard>/<sample key>".

A unit is one shard. Its sample count is metadata: img2dataset's "<shard>_stats.json" ("successes") beside it when
present, else a scan of the shard's member headers (a sequential read of the shard: give object-store corpora
their stats files).
"""
from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from tim_ray.data.records import CAPTION_NOT_UTF8, INVALID_CAPTION, RawSample, stable_id
from tim_ray.data.sources.filesystem import FileSet, FileSource, list_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_EXTENSIONS = ("tar", "tar.gz", "tgz")
CAPTION_FIELDS = ("captions", "caption", "text")
STATS_SUFFIX = "_stats.json"
COUNT_THREADS = 32


def split_member(name: str) -> tuple[str, str]:
    """'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg'): the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def grouped_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per run of consecutive members with the same key."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        member_key, extension = split_member(member.name)
        if member_key != key and parts:
            yield key, parts
            parts = {}
        key = member_key
        parts[extension] = tar.extractfile(member).read()
    if parts:
        yield key, parts


def metadata_fields(parts: dict[str, bytes]) -> tuple[object, int, str]:
    """(captions, label, reject reason) from the .txt / .json members."""
    if "txt" in parts:
        return parts["txt"], -1, ""
    if "json" not in parts:
        return None, -1, ""
    try:
        meta = json.loads(parts["json"])
    except UnicodeDecodeError:
        return None, -1, CAPTION_NOT_UTF8
    except json.JSONDecodeError:
        return None, -1, INVALID_CAPTION
    if not isinstance(meta, dict):
        return None, -1, INVALID_CAPTION
    captions = next((meta[f] for f in CAPTION_FIELDS if f in meta), None)
    label = meta.get("label")
    return captions, label if isinstance(label, int) else -1, ""


def _shard_stem(shard: str) -> str:
    for extension in SHARD_EXTENSIONS:
        if shard.endswith(f".{extension}"):
            return shard[:-len(extension) - 1]
    return shard


class WebDatasetSource(FileSource):
    name = "webdataset"

    def __init__(self, path: str, timeout_s: float | None = None):
        self.files: FileSet = list_files(path, SHARD_EXTENSIONS, sidecars=(STATS_SUFFIX,), timeout_s=timeout_s)

    def _count(self, shard: str) -> int:
        """Samples in a shard: its img2dataset stats, else a scan of its members (0 if it cannot be read)."""
        stats = _shard_stem(shard) + STATS_SUFFIX
        if stats in self.files.sidecars:
            try:
                with self.files.filesystem().open_input_stream(self.files.full_path(stats)) as f:
                    return int(json.loads(f.read())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a broken stats file: count the shard itself
        count = 0
        try:
            with self.files.filesystem().open_input_stream(self.files.full_path(shard)) as stream, \
                    tarfile.open(fileobj=stream, mode="r|*") as tar:
                key = None
                for member in tar:
                    if member.isfile() and split_member(member.name)[0] != key:
                        key, count = split_member(member.name)[0], count + 1
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            count = max(count, 1)  # the sample being read, or the whole shard, is one `unreadable_file` row
        return count

    def units(self) -> list[dict]:
        with ThreadPoolExecutor(COUNT_THREADS) as pool:
            counts = list(pool.map(self._count, self.files.keys))
        return [{"name": shard, "rows": rows} for shard, rows in zip(self.files.keys, counts) if rows]

    def read(self, unit: dict) -> Iterator[RawSample]:
        shard = unit["name"]
        stream = self.files.filesystem().open_input_stream(self.files.full_path(shard))
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for key, parts in grouped_members(tar):
                    row_key = f"{shard}/{key}"
                    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                    captions, label, reject = metadata_fields(parts)
                    yield RawSample(sample_id=stable_id(row_key), key=row_key, image=image, captions=captions,
                                    label=label, reject=reject)
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            return  # the window reader names the missing samples `unreadable_file`
        finally:
            stream.close()
