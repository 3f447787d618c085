"""A directory of images, captioned by a sidecar text file ("cat.jpg" + "cat.txt") or by `captions.jsonl` at the
root, one JSON object per line: {"file": "<image path relative to the root>", "caption": "..."} (or "captions":
[...], or "text"). A sidecar wins over a jsonl entry. A row's key is the image path relative to the root.

captions.jsonl is read once on the driver; a line that is not valid JSON becomes an `invalid_caption` record keyed
"captions.jsonl:<line number>" (its image, if any, then has no caption and is rejected as such).
"""
from __future__ import annotations

import json
from collections.abc import Iterator

from tim_ray.data.records import INVALID_CAPTION, RawSample, stable_id
from tim_ray.data.sources.filesystem import FileSet, FileSource, list_files
from tim_ray.data.sources.webdataset import CAPTION_FIELDS, IMAGE_EXTENSIONS

CAPTIONS_FILE = "captions.jsonl"
IMAGES_PER_UNIT = 256


def parse_captions_jsonl(data: bytes) -> tuple[dict[str, object], list[dict]]:
    """({image key: caption value}, [invalid line records]). Bytes that are not UTF-8 survive as lone surrogates,
    so the caption check rejects that one image as `caption_not_utf8` instead of the whole file failing."""
    captions, invalid = {}, []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            invalid.append({"key": f"{CAPTIONS_FILE}:{number}", "reason": INVALID_CAPTION})
            continue
        captions[entry["file"]] = next((entry[f] for f in CAPTION_FIELDS if f in entry), None)
    return captions, invalid


class FolderSource(FileSource):
    name = "folder"

    def __init__(self, path: str, timeout_s: float | None = None):
        self.files: FileSet = list_files(path, IMAGE_EXTENSIONS + ("txt", "jsonl"), timeout_s=timeout_s)
        keys = set(self.files.keys)
        self.images = [k for k in self.files.keys if k.lower().endswith(tuple(f".{e}" for e in IMAGE_EXTENSIONS))]
        self.sidecars = {k for k in keys if k.endswith(".txt")}
        self.jsonl_captions, self.invalid_lines = {}, []
        if CAPTIONS_FILE in keys:
            with self.files.filesystem().open_input_stream(self.files.full_path(CAPTIONS_FILE)) as f:
                self.jsonl_captions, self.invalid_lines = parse_captions_jsonl(f.read())

    def units(self) -> list[dict]:
        chunks = [self.images[i:i + IMAGES_PER_UNIT] for i in range(0, len(self.images), IMAGES_PER_UNIT)]
        units = [{"name": chunk[0], "rows": len(chunk), "images": chunk,
                  "captions": {k: self.jsonl_captions.get(k) for k in chunk}, "invalid": []} for chunk in chunks]
        if self.invalid_lines:
            units.append({"name": CAPTIONS_FILE, "rows": len(self.invalid_lines), "images": [], "captions": {},
                          "invalid": self.invalid_lines})
        return units

    def _sidecar(self, image_key: str) -> str | None:
        sidecar = image_key.rsplit(".", 1)[0] + ".txt"
        return sidecar if sidecar in self.sidecars else None

    def read(self, unit: dict) -> Iterator[RawSample]:
        fs = self.files.filesystem()
        for key in unit["images"]:
            with fs.open_input_stream(self.files.full_path(key)) as f:
                image = f.read()
            sidecar = self._sidecar(key)
            if sidecar:
                with fs.open_input_stream(self.files.full_path(sidecar)) as f:
                    captions = f.read()
            else:
                captions = unit["captions"][key]
            yield RawSample(sample_id=stable_id(key), key=key, image=image, captions=captions)
        for record in unit["invalid"]:
            yield RawSample(sample_id=stable_id(record["key"]), key=record["key"], image=None, captions=None,
                            reject=record["reason"])
