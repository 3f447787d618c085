"""One rank's batches of one epoch, streamed: windows (read once for all ranks by the WindowCache) -> Ray Data:
this rank's rows of each global batch taken, decoded, checked, augmented -> text-encoder and codec actor pools ->
one Arrow table per batch, in order -> `to_batch`.

Memory is bounded by what is in flight: the windows the cache keeps, `data.decode_tasks` decode tasks (each makes
a few consecutive batches, about TASK_BYTES of pixels: batches_per_task) and RUN_AHEAD_BYTES of finished batches.
Nothing is held per row of the data set.

A task's batches travel as one Ray Data block, never split (target_max_block_size = None), and the encoders encode
each batch (`group`) of a block in its own call, so the result does not depend on how batches share blocks;
`preserve_order` keeps blocks in plan order, and `regroup` cuts the output back into batches. Each batch table
carries its plan: `group` (the epoch position after it, which grows along the stream), `global_rows` (its rows over
all ranks) and, on its first row, the JSON list of its rejected rows. A rank whose rows were all rejected still
gets its batch, as one `filler` row that training ignores, so every rank runs every step.

Only `to_batch`, which runs in the training process, imports torch: every Ray worker that runs a decode task
imports this module, and torch would cost each one about 2 CPU-seconds (tests/test_data_decode.py checks).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data import ExecutionResources
from ray.data._internal.execution.execution_callback import ExecutionCallback

from tim_ray.data.decode import clean_sample
from tim_ray.data.encode import add_encode_stages, group_runs, unit_range
from tim_ray.data.order import NOISE, PlannedBatch, draw, fixed_batches, hash64, rank_slice, window_batches
from tim_ray.data.records import RawSample
from tim_ray.data.tensors import row_tensors, stacked, with_tensor

RUN_AHEAD_BYTES = 128 * 2**20
# Windows per Ray Data execution: an epoch of a huge set runs as several executions of this many windows (one
# input block per decode task: up to 8192 for 64 windows of 8192 rows in batches of 64), and each execution
# starts its encoder actors anew.
WINDOWS_PER_PIPELINE = 64
# Decoded bytes a decode task aims at (see batches_per_task), and its most batches.
TASK_BYTES = 16 * 2**20
MAX_BATCHES_PER_TASK = 32


class IdleBackoff(ExecutionCallback):
    """Sleeps after a scheduling step in which nothing happened.

    Ray Data's scheduling loop (Ray 2.60) blocks in ray.wait only while some task's next output is not ready. Once
    the pipeline is `RUN_AHEAD_BYTES` ahead of training, no task runs or every running task holds an output that
    backpressure keeps it from taking, each step returns at once and the thread spins inside the training process.
    A step that submitted no task, took no output and finished no task sleeps `SLEEP_S`, which delays by at most
    that much the refill of a run-ahead that holds many batches. An idle step costs about 1 ms of Python under the
    GIL: at 10 ms the loop took 13% of a core from the training process, at 100 ms the quickstart ran 16% faster.
    An earlier version slept only after steps shorter than 1 ms; with the training thread holding the GIL idle
    steps took longer, the loop kept spinning and py-spy found half of the training process's samples in it.
    """

    SLEEP_S = 0.1

    def __init__(self):
        self._seen = None

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None) or {}  # Ray 2.60's operators; no public accessor
        seen = tuple((m.num_tasks_submitted, m.num_task_outputs_generated, m.num_tasks_finished, m.num_outputs_taken)
                     for m in (op.metrics for op in topology))
        if seen == self._seen:
            time.sleep(self.SLEEP_S)
        self._seen = seen


def _raw_sample(row: dict) -> RawSample:
    image = row["image"]
    if row["image_shape"]:
        image = np.frombuffer(image, dtype=np.uint8).reshape(row["image_shape"])
    return RawSample(sample_id=row["sample_id"], key=row["key"], image=image, captions=row["captions"] or None,
                     label=row["label"], scene=row["scene"], reject=row["reject"])


def _plan_columns(table: pa.Table, batch: PlannedBatch, rejects: list[dict], filler: bool) -> pa.Table:
    rows = table.num_rows
    return (table.append_column("group", pa.array(np.full(rows, batch.after, dtype=np.int64)))
            .append_column("global_rows", pa.array(np.full(rows, len(batch.positions), dtype=np.int64)))
            .append_column("filler", pa.array(np.full(rows, filler)))
            .append_column("rejects", pa.array([json.dumps(rejects)] + [""] * (rows - 1), pa.string())))


def clean_batch(rows: pa.Table, data, epoch: int) -> tuple[pa.Table, list[dict]]:
    """Raw rows -> (decoded, checked and augmented rows, reject records). Caption pick, caption dropout and flips
    are this epoch's draws for each sample id (order.draw), the codec noise seed a hash of (seed, epoch, id)."""
    good, rejects = [], []
    for row in rows.to_pylist():
        clean = clean_sample(_raw_sample(row), data.geometry, data.limits)
        if clean["reject"]:
            rejects.append({"source": data.source.name, "id": row["key"], "sample_id": row["sample_id"],
                            "reason": clean["reject"], "epoch": epoch})
        else:
            good.append(clean)
    if not good:
        return None, rejects
    ids = np.array([r["sample_id"] for r in good], dtype=np.int64)
    draws = draw(ids, np.array([len(r["captions"]) for r in good]), data.seed, epoch, data.hflip,
                 data.caption_dropout)
    out = pa.table({
        "sample_id": ids,
        "key": pa.array([r["key"] for r in good], pa.string()),
        "scene": pa.array([r["scene"] for r in good], pa.string()),
        "label": np.array([r["label"] for r in good], dtype=np.int64),
        "bucket": np.array([r["bucket"] for r in good], dtype=np.int32),
        "caption": pa.array(["" if drop else r["captions"][pick] for r, drop, pick in
                             zip(good, draws.drop, draws.caption)], pa.string()),
        "noise_seed": (hash64(ids, data.seed, epoch, NOISE) >> np.uint64(1)).astype(np.int64),
    })
    pixels = [r["pixels"][:, ::-1] if flip else r["pixels"] for r, flip in zip(good, draws.flip)]
    if len({p.shape for p in pixels}) == 1:  # a batch is one bucket: one array, one copy of each image
        pixels = np.stack(pixels)
    return with_tensor(out, "pixels", pixels), rejects


def filler_row(data) -> pa.Table:
    """One blank row (black image, empty caption) standing for a batch whose rows were all rejected."""
    height, width = data.geometry.sizes[0]
    out = pa.table({"sample_id": np.array([-1], dtype=np.int64), "key": pa.array([""], pa.string()),
                    "scene": pa.array([""], pa.string()), "label": np.zeros(1, dtype=np.int64),
                    "bucket": np.zeros(1, dtype=np.int32), "caption": pa.array([""], pa.string()),
                    "noise_seed": np.zeros(1, dtype=np.int64)})
    return with_tensor(out, "pixels", [np.zeros((height, width, data.geometry.channels), dtype=np.uint8)])


def augment_precomputed(rows: pa.Table, data, epoch: int) -> pa.Table:
    """Precomputed rows with this epoch's flips (the stored flipped latents, or mirrored pixels) and caption
    dropout (the stored encoding of "")."""
    ids = rows["sample_id"].to_numpy()
    draws = draw(ids, np.ones(len(ids)), data.seed, epoch, data.hflip, data.caption_dropout)
    keep = ["sample_id", "label", "bucket"]
    out = rows.select(keep)
    if "pixels" in rows.column_names:
        pixels = row_tensors(rows, "pixels")
        out = with_tensor(out, "pixels", [p[:, ::-1] if f else p for p, f in zip(pixels, draws.flip)])
    else:
        images = row_tensors(rows, "image")
        mirrored = (row_tensors(rows, "image_flipped") if "image_flipped" in rows.column_names
                    else [image[..., ::-1] for image in images])
        out = with_tensor(out, "image", [m if f else i for i, m, f in zip(images, mirrored, draws.flip)])
    if "text" in rows.column_names:
        text, mask = row_tensors(rows, "text"), row_tensors(rows, "text_mask")
        if data.null_text is not None:
            text = [data.null_text[0] if d else t for t, d in zip(text, draws.drop)]
            mask = [data.null_text[1] if d else m for m, d in zip(mask, draws.drop)]
        out = with_tensor(with_tensor(out, "text", text), "text_mask", mask)
    return out


def _take(layout, window_table, positions: np.ndarray) -> pa.Table:
    """The rows at these flat positions, in order (positions are increasing, so their windows are too)."""
    windows, local = layout.locate(positions)
    return pa.concat_tables([window_table(int(w)).take(local[windows == w]) for w in np.unique(windows)])


def _window_plan(layout, data, window: int, start: int, global_batch: int | None, window_table) -> list:
    """The global batches planned in a window: those that start in it (fixed size), or its bucketed batches after
    `start` (read from the window's bucket column)."""
    if global_batch is not None:
        return fixed_batches(layout, start, global_batch, window=window)
    buckets = window_table(window)["bucket"].to_numpy()
    return [b for b in window_batches(layout, window, buckets, data.bucket_batch_sizes) if b.after > start]


def batch_chunk(item: pa.Table, *, data, epoch: int, start: int, global_batch: int | None, rank: int,
                world: int, cache) -> Iterator[pa.Table]:
    """Ray Data map: (window, first, count) -> this rank's share of that window's planned global batches
    first .. first + count - 1, in order, one table each (Ray Data joins them into the task's one output block);
    nothing for slots the window does not plan (bucketed windows: the slots are an upper bound)."""
    window, first, count = (item[name][0].as_py() for name in ("window", "first", "count"))
    layout = data.layout(epoch)
    tables: dict[int, pa.Table] = {}

    def window_table(w: int) -> pa.Table:
        if w not in tables:
            tables[w] = ray.get(ray.get(cache.window.remote(epoch, w))[0])
        return tables[w]

    for batch in _window_plan(layout, data, window, start, global_batch, window_table)[first:first + count]:
        rows = _take(layout, window_table, rank_slice(batch.positions, rank, world))
        if data.precomputed:
            yield _plan_columns(augment_precomputed(rows, data, epoch), batch, [], False)
            continue
        table, rejects = clean_batch(rows, data, epoch)
        yield _plan_columns(filler_row(data) if table is None else table, batch, rejects, table is None)


def _slots(layout, data, window: int, start: int, global_batch: int | None) -> int:
    """How many batches window `window` can plan: exact for fixed size, an upper bound for buckets."""
    if global_batch is not None:
        return len(fixed_batches(layout, start, global_batch, window=window))
    return -(-layout.window_size(window) // int(min(data.bucket_batch_sizes)))


def batches_per_task(data, global_batch: int | None, world: int) -> int:
    """How many of a rank's batches one decode task makes: about TASK_BYTES of decoded pixels. Each Ray Data task
    costs tens of ms of CPU over the driver, the worker and Ray's daemons (measured: 32x32 rows in tasks of 1024
    rows used 0.6-0.75x the CPU per row of tasks of 256), which only matters when a batch is little work."""
    rows = (global_batch or max(data.bucket_batch_sizes)) / world
    row_bytes = max(height * width for height, width in data.geometry.sizes) * data.geometry.channels
    return max(1, min(MAX_BATCHES_PER_TASK, int(TASK_BYTES // max(1.0, rows * row_bytes))))


def task_items(slots: list[tuple[int, int]], most: int) -> list[dict]:
    """Decode task items {window, first, count} over (window, slots) in order. A task's output appears only when
    it ends, so the first tasks of a pipeline take 1, 2, 4, ... batches up to `most`: the first step waits for one
    batch to be decoded (and text-encoded), not for `most`."""
    items, size = [], 1
    for window, count in slots:
        first = 0
        while first < count:
            items.append({"window": window, "first": first, "count": min(size, count - first)})
            first += size
            size = min(most, size * 2)
    return items


def _configure(ds: ray.data.Dataset) -> None:
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = None  # a block is a task's batches: keep it whole however large
    ds.context.enable_progress_bars = False
    # Run at most this far ahead of training: unbounded, the pipeline encodes a whole epoch into the object store
    # at once and competes with the training step for the CPU (seen on the quickstart: 1.7 GiB, 3x slower steps).
    ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=RUN_AHEAD_BYTES)
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdleBackoff]


def regroup(blocks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """One table per group from a stream of blocks in group order (a group may span blocks)."""
    pending = None
    for block in blocks:
        if block.num_rows == 0:
            continue
        table = pa.concat_tables([pending, block]) if pending is not None else block
        runs = group_runs(table)
        for begin, stop in runs[:-1]:
            yield table.slice(begin, stop - begin)
        pending = table.slice(runs[-1][0])  # the last group may go on in the next block
    if pending is not None:
        yield pending


def rank_stream(data, epoch: int, start: int, global_batch: int | None, rank: int, world: int,
                cache) -> Iterator[pa.Table]:
    """This rank's batch tables for the rest of `epoch` after `start` samples, in order (see module docstring).
    global_batch: rows per step of fixed-size data; None for aspect buckets (sized by the token budget)."""
    layout = data.layout(epoch)
    first = int(layout.window_of(start)) if start < layout.num_rows else layout.num_windows
    most = batches_per_task(data, global_batch, world)
    for chunk in range(first, layout.num_windows, WINDOWS_PER_PIPELINE):
        windows = range(chunk, min(chunk + WINDOWS_PER_PIPELINE, layout.num_windows))
        items = task_items([(w, _slots(layout, data, w, start, global_batch)) for w in windows], most)
        if not items:
            continue
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one item, so one task, per block
        _configure(ds)
        ds = ds.map_batches(batch_chunk, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.TaskPoolStrategy(size=data.decode_tasks),
                            fn_kwargs={"data": data, "epoch": epoch, "start": start, "global_batch": global_batch,
                                       "rank": rank, "world": world, "cache": cache})
        if not data.precomputed:
            ds = add_encode_stages(ds, data.encoders)
        yield from regroup(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


@dataclass
class BatchPlan:
    """What came with a batch besides its tensors."""

    global_rows: int  # rows planned for this step over all ranks (rejects included)
    after: int  # epoch samples consumed after this step
    rejects: list[dict]


def to_batch(table: pa.Table) -> tuple[dict[str, torch.Tensor], BatchPlan]:
    """The training batch of one batch table (see tim_ray.data for the format), and its plan. Pixels become
    [-1, 1] channels-first; without text features (class conditioning) text is (B, 0, 0) and text_mask (B, 0).
    A filler row gives a batch of 0 rows."""
    import torch

    plan = BatchPlan(global_rows=int(table["global_rows"][0].as_py()), after=int(table["group"][0].as_py()),
                     rejects=json.loads(table["rejects"][0].as_py() or "[]"))
    table = table.filter(pc.invert(table["filler"]))
    rows = table.num_rows
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64)
        return {"image": torch.zeros(0), "text": torch.zeros(0, 0, 0), "text_mask": torch.zeros(0, 0, dtype=torch.bool),
                "label": empty, "sample_id": empty}, plan
    image = (torch.from_numpy(stacked(table, "image")) if "image" in table.column_names
             else unit_range(stacked(table, "pixels")))
    if "text" in table.column_names:
        text, text_mask = torch.from_numpy(stacked(table, "text")), torch.from_numpy(stacked(table, "text_mask"))
    else:
        text, text_mask = torch.zeros(rows, 0, 0), torch.zeros(rows, 0, dtype=torch.bool)
    return {"image": image, "text": text, "text_mask": text_mask,
            "label": torch.from_numpy(table["label"].to_numpy().astype(np.int64)),
            "sample_id": torch.from_numpy(table["sample_id"].to_numpy().astype(np.int64))}, plan
