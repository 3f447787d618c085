"""WebDataset tar shards: members sharing a key ("dir/000123.jpg", "dir/000123.txt") form one sample.

The image is the first member with an image extension; the caption is the `.txt` member, else the `caption`,
`captions` or `text` field of the `.json` member (whose optional int `label` is kept). Read with Python's tarfile
(streaming, any pyarrow filesystem), so a corrupt member is one rejected sample; a shard cut short yields one
`unreadable_file` record after the samples before the cut. A row's key is "<shard>/<sample key>".
"""
from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator

from tim_ray.data.records import CAPTION_NOT_UTF8, INVALID_CAPTION, UNREADABLE_FILE, RawSample, stable_id
from tim_ray.data.sources.filesystem import FileSet, list_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_EXTENSIONS = ("tar", "tar.gz", "tgz")
CAPTION_FIELDS = ("captions", "caption", "text")


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


class WebDatasetSource:
    name = "webdataset"

    def __init__(self, path: str):
        self.files: FileSet = list_files(path, SHARD_EXTENSIONS)

    def units(self) -> list[str]:
        return list(self.files.keys)

    def read(self, shard: str) -> Iterator[RawSample]:
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
            yield RawSample(sample_id=stable_id(shard), key=shard, image=None, captions=None, reject=UNREADABLE_FILE)
        finally:
            stream.close()
