"""Reading one shuffle window (whole source units) into an Arrow table, and `WindowCache`, the actor that has each
window read once for all ranks and keeps the last few in the object store.

A window of a raw source holds its rows as read, images still encoded (RAW_SCHEMA): the captions are checked and
the bucket found from the image header here (cheap), the pixels are decoded later, only for the rows a rank takes
(stream.py). A window of precomputed shards holds the shard rows as stored. Every unit contributes exactly its
metadata row count, so positions computed from metadata (order.py) always name a row: a unit that turns out
shorter (a file cut short, a tar with fewer samples than its stats said) is filled with `unreadable_file` rejects.
"""
from __future__ import annotations

import io
import warnings
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from tim_ray.data.decode import Rejected, clean_captions
from tim_ray.data.records import MISSING_IMAGE, UNREADABLE_FILE, RawSample, stable_id

# One source row as read: `image` holds the encoded file, or a decoded array's bytes with its shape in
# `image_shape` (built-in sources); `reject` is set when the row is already known to be unusable.
RAW_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("key", pa.string()),
    ("label", pa.int64()),
    ("captions", pa.list_(pa.string())),
    ("image", pa.binary()),
    ("image_shape", pa.list_(pa.int32())),
    ("bucket", pa.int32()),
    ("scene", pa.string()),
    ("reject", pa.string()),
])


def unit_samples(source, unit: dict) -> list[RawSample]:
    """Exactly unit["rows"] samples of a unit: extra rows cut, missing ones filled with `unreadable_file`."""
    want, samples = unit["rows"], []
    for sample in source.read(unit):
        if len(samples) == want:
            break
        samples.append(sample)
    first = unit.get("first_row", 0)
    for row in range(len(samples), want):
        key = f"{unit['name']}#{first + row}"
        samples.append(RawSample(sample_id=stable_id(key), key=key, image=None, captions=None,
                                 reject=UNREADABLE_FILE))
    return samples


def _bucket_of_header(image: bytes, geometry) -> int:
    """The bucket from the image header alone; 0 when the header is unreadable (decoding then names the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            width, height = Image.open(io.BytesIO(image)).size
    except Exception:  # noqa: BLE001 - any header PIL cannot parse; the decode step classifies it
        return 0
    return geometry.bucket_of(height, width) if width and height else 0


def raw_row(sample: RawSample, geometry) -> dict:
    """A RAW_SCHEMA row: captions checked, bucket found (aspect buckets only), pixels left encoded."""
    row = {"sample_id": sample.sample_id, "key": sample.key, "label": sample.label, "captions": [], "image": b"",
           "image_shape": [], "bucket": 0, "scene": sample.scene, "reject": sample.reject}
    if sample.reject:
        return row
    try:
        row["captions"] = clean_captions(sample.captions)
        if sample.image is None:
            raise Rejected(MISSING_IMAGE)
    except Rejected as rejected:
        return {**row, "reject": rejected.reason}
    if isinstance(sample.image, np.ndarray):
        row["image"], row["image_shape"] = np.ascontiguousarray(sample.image).tobytes(), list(sample.image.shape)
        if geometry.bucketed:
            row["bucket"] = geometry.bucket_of(*sample.image.shape[:2])
    else:
        row["image"] = bytes(sample.image)
        if geometry.bucketed:
            row["bucket"] = _bucket_of_header(row["image"], geometry)
    return row


def raw_table(source, units: list[dict], geometry) -> pa.Table:
    """RAW_SCHEMA rows of these units, in order (built column by column: 10x faster than row dicts)."""
    rows = [raw_row(sample, geometry) for unit in units for sample in unit_samples(source, unit)]
    return pa.table({name: [row[name] for row in rows] for name in RAW_SCHEMA.names}, schema=RAW_SCHEMA)


def read_window(data, epoch: int, window: int) -> pa.Table:
    """The rows of one window of `data` (a StreamingData), units concatenated in window order."""
    units = [data.units[u] for u in data.layout(epoch).window_units(window)]
    return data.source.read_rows(units) if data.precomputed else raw_table(data.source, units, data.geometry)


@ray.remote(num_cpus=0)
class WindowCache:
    """Has each (epoch, window) read once, by a Ray task, and hands its object ref to every rank that asks. Keeps
    the `keep` most recently asked windows and reads the next one ahead. A window asked for again after it left
    is read again: eviction costs time, never correctness."""

    def __init__(self, data_ref: list[ray.ObjectRef], keep: int):
        # The data set stays in the object store: each read task gets the ref, not a pickled copy of every unit.
        self.data_ref, self.keep = data_ref[0], keep
        self.data = ray.get(self.data_ref)
        self.cached: OrderedDict[tuple[int, int], ray.ObjectRef] = OrderedDict()
        self.reads = 0

    def _ensure(self, key: tuple[int, int]) -> ray.ObjectRef:
        if key not in self.cached:
            # An explicit strategy: the read is nobody's child in a placement group. Inside a Tune trial (which
            # captures child tasks into the trial's group) it would otherwise wait forever for a CPU of a bundle
            # the training worker holds.
            self.cached[key] = _read_window_task.options(scheduling_strategy="DEFAULT").remote(self.data_ref, *key)
            self.reads += 1
        self.cached.move_to_end(key)
        while len(self.cached) > self.keep:
            self.cached.popitem(last=False)
        return self.cached[key]

    def window(self, epoch: int, window: int) -> list[ray.ObjectRef]:
        """[ref] of the window's table (in a list, so that Ray hands over the ref, not the table)."""
        ref = self._ensure((epoch, window))
        if window + 1 < self.data.layout(epoch).num_windows and self.keep > 1:
            self._ensure((epoch, window + 1))
            self.cached.move_to_end((epoch, window))
        return [ref]

    def stats(self) -> dict:
        return {"reads": self.reads, "cached": len(self.cached)}


@ray.remote
def _read_window_task(data, epoch: int, window: int) -> pa.Table:
    return read_window(data, epoch, window)
