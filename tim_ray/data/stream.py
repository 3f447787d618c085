"""Groups of cleaned rows -> Ray Data (gather + augment, text encoder, codec) -> one encoded table per group, in
order; and the conversion of such a table into a training batch.

A group is a list of row positions of one bucket: a rank's share of one global batch (training) or a chunk of
rows (precompute). Each group travels as its own Ray Data block, never split (target_max_block_size = None), so
every encoder call sees exactly one group; `preserve_order` keeps the groups in plan order, and `regroup` cuts
the output back into groups whatever blocks Ray Data hands over.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import ExecutionResources
from ray.data._internal.execution.execution_callback import ExecutionCallback
import torch

from tim_ray.data.encode import EncoderSpec, add_encode_stages, group_runs, unit_range
from tim_ray.data.order import NOISE, draw, hash64
from tim_ray.data.tensors import row_tensors, stacked, with_tensor


RUN_AHEAD_BYTES = 128 * 2**20


class IdleBackoff(ExecutionCallback):
    """Sleeps between scheduling steps that did no waiting.

    Ray Data's scheduling loop (Ray 2.60) blocks in ray.wait only while some task is running. Once the pipeline is
    `RUN_AHEAD_BYTES` ahead of training and nothing runs, each step returns at once and the thread spins a whole
    core inside the training process, which took 2-3x off the quickstart's step time on 2 cores. A step that
    returns in under `FAST_STEP_S` means there was nothing to wait on; sleeping `SLEEP_S` delays by at most that
    much the refill of a run-ahead that holds many batches. Each step still costs about 1 ms of Python under the
    GIL: at 10 ms the loop took 13% of a core from the training process and the quickstart ran at 93 images/s;
    at 100 ms, 108 (alternating 25-step windows of one run; data-wait share 1.4% in both).
    """

    FAST_STEP_S = 0.001
    SLEEP_S = 0.1

    def __init__(self):
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if now - self._last < self.FAST_STEP_S:
            time.sleep(self.SLEEP_S)
            now = time.perf_counter()
        self._last = now


def plan_blocks(groups: list[np.ndarray]) -> list[pa.Table]:
    """The plan as one (group, position) table per group."""
    return [pa.table({"group": np.full(len(positions), index, dtype=np.int64),
                      "position": np.asarray(positions, dtype=np.int64)}) for index, positions in enumerate(groups)]


def gather_rows(plan: pa.Table, clean: pa.Table, seed: int, epoch: int, hflip: bool,
                caption_dropout: float) -> pa.Table:
    """The planned rows of the clean table with this epoch's caption pick, caption dropout and flips applied."""
    rows = clean.take(plan["position"])
    sample_ids = rows["sample_id"].to_numpy()
    captions = rows["captions"].to_pylist()
    draws = draw(sample_ids, np.array([len(c) for c in captions]), seed, epoch, hflip, caption_dropout)
    caption = ["" if drop else options[pick] for options, drop, pick in zip(captions, draws.drop, draws.caption)]
    out = pa.table({
        "group": plan["group"],
        "sample_id": rows["sample_id"],
        "label": rows["label"],
        "bucket": rows["bucket"],
        "caption": pa.array(caption, pa.string()),
        "noise_seed": (hash64(sample_ids, seed, epoch, NOISE) >> np.uint64(1)).astype(np.int64),
    })
    pixels = row_tensors(rows, "pixels")
    return with_tensor(out, "pixels", [p[:, ::-1] if flip else p for p, flip in zip(pixels, draws.flip)])


def _gather_from_store(plan: pa.Table, table_ref: ray.ObjectRef, **kwargs) -> pa.Table:
    """gather_rows in a Ray worker: the clean table comes from the object store (zero-copy), not with each task."""
    return gather_rows(plan, ray.get(table_ref), **kwargs)


def regroup(blocks: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """One table per group from a stream of blocks in group order (a group may span blocks)."""
    pending = None
    for block in blocks:
        if block.num_rows == 0:
            continue
        table = pa.concat_tables([pending, block]) if pending is not None else block
        runs = group_runs(table)
        for start, stop in runs[:-1]:
            yield table.slice(start, stop - start)
        pending = table.slice(runs[-1][0])  # the last group may go on in the next block
    if pending is not None:
        yield pending


def encoded_groups(table: pa.Table, groups: list[np.ndarray], encoders: EncoderSpec, *, seed: int, epoch: int,
                   hflip: bool, caption_dropout: float, with_flipped: bool = False) -> Iterator[pa.Table]:
    """Each group of `table` (clean rows) gathered, augmented and encoded by Ray Data, one table per group."""
    if not groups:
        return
    ds = ray.data.from_arrow(plan_blocks(groups))
    ds.context.execution_options.preserve_order = True
    ds.context.target_max_block_size = None  # a block is one group: keep it whole however large
    ds.context.enable_progress_bars = False
    # Run at most this far ahead of training: unbounded, the pipeline encodes a whole epoch into the object store
    # at once and competes with the training step for the CPU (seen on the quickstart: 1.7 GiB, 3x slower steps).
    ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=RUN_AHEAD_BYTES)
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdleBackoff]
    ds = ds.map_batches(_gather_from_store, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"table_ref": ray.put(table), "seed": seed, "epoch": epoch, "hflip": hflip,
                                   "caption_dropout": caption_dropout})
    ds = add_encode_stages(ds, encoders, with_flipped)
    yield from regroup(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def to_batch(table: pa.Table) -> dict[str, torch.Tensor]:
    """The training batch of one group (see tim_ray.data for the format). Pixels become [-1, 1] channels-first;
    without text features (class conditioning) text is (B, 0, 0) and text_mask (B, 0)."""
    rows = table.num_rows
    image = (torch.from_numpy(stacked(table, "image")) if "image" in table.column_names
             else unit_range(stacked(table, "pixels")))
    if "text" in table.column_names:
        text, text_mask = torch.from_numpy(stacked(table, "text")), torch.from_numpy(stacked(table, "text_mask"))
    else:
        text, text_mask = torch.zeros(rows, 0, 0), torch.zeros(rows, 0, dtype=torch.bool)
    return {"image": image, "text": text, "text_mask": text_mask,
            "label": torch.from_numpy(table["label"].to_numpy().astype(np.int64)),
            "sample_id": torch.from_numpy(table["sample_id"].to_numpy().astype(np.int64))}
