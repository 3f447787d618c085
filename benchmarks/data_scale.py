"""Does `tim-ray train` on parquet data stay flat in start-up time and memory as the data set grows, and does its
data stream keep up with a plain reader per CPU? One run of this script measures every size against the smallest
(a benchmark, never a test).

    python benchmarks/data_scale.py [--sizes 20000,200000,2000000] [--steps 20] [--stream-rows 20000]
                                    [--cache-dir DIR] [--timeout 3600] [--side 32] [--rows-per-file 50000]
                                    [--set SECTION.KEY=VALUE ...] [--json OUT] [--work-dir DIR] [--skip-plain]
                                    [--skip-stream] [--tim-ray PATH]

For each size N (rows):
  data     N rows of 32x32 RGB PNGs (gradients, coloured shapes, light grain) with a `caption` string column that
           describes them and an `image` binary column, in parquet files of <= --rows-per-file rows (at least 4
           files) with row groups of 1000 rows; the image column without dictionary encoding, so files are as large
           as distinct images would make them (~1.1 kB a row: 2M rows ~ 2.1 GB). The rows cycle through a pool of
           4096 distinct images in a per-file random order. Cached under --cache-dir (default
           ~/.cache/tim-ray/bench-data-scale) and reused; a finished directory holds a `_COMPLETE` marker.
  plain    a single-process reader over the first --stream-rows rows (all of a smaller set): pyarrow iter_batches,
           PIL decode, resize to the train size, numpy array: rows/s and rows per CPU-second of this process.
  stream   the training data stream alone, in a subprocess with its own RAY_TMPDIR and local Ray (as tim-ray train
           starts it: ray.local_num_cpus logical CPUs):
           `open_training_data` of the set for class-conditioned pixels (model.conditioning=class, model.codec=pixel:
           no encoder stage; --set overrides apply first) keeping its first --stream-rows rows (data.max_samples),
           epoch 0 as a warm-up (every Ray worker the stream uses started, each importing torch once), then the
           whole of epoch 1 (another order, windows read anew) of `rank_batches(data, 1, 0, global batch 256,
           rank 0, world 1, cache)`, so that nothing produced is left uncounted: the steady state of a long run.
           Measured over that epoch: rows/s, and the CPU-seconds the run used meanwhile: utime + stime
           (/proc/PID/stat) of the subprocess and every process under its RAY_TMPDIR (Ray daemons, workers, the
           window cache), sampled every 0.5 s and at both ends (a process that exits loses at most its last 0.5 s).
           Rows per CPU-second is the honest "per CPU" figure on a shared machine; CPUs used = CPU-seconds / wall
           seconds. Target: stream >= 0.9x the plain reader per CPU-second.
  tim-ray  `tim-ray train data.source=parquet data.path=DIR train.steps=--steps train.log_every=1 ...` as a
           subprocess in its own session, with its own RAY_TMPDIR, cwd in a scratch directory, tracking off, no
           checkpoint or sample grid before the last step (eval.nfe=[1]), killed after --timeout seconds. Measured:
    first step   seconds from launch to the end of step 1: the `time` of the first "metrics" event in
                 <run dir>/events.jsonl (rank 0 writes it right after the step, with train.log_every=1). This is the
                 earliest reliable signal: the "[tim-ray] step 1/..." stdout line is printed at the same moment by
                 the worker but reaches the driver's stdout only through Ray's log monitor, later. Also shown: the
                 "start" event (the train loop began: model built, Ray Train up) and the driver's
                 "... source rows in ... units" stdout line (data opened), when the run prints it.
    peak PSS     max over time of the sum of PSS (/proc/PID/smaps_rollup) over the tim-ray process, all its
                 descendants, and every process whose cmdline or environ names the run's RAY_TMPDIR (Ray daemons
                 and workers, even when reparented), sampled every 0.5 s. Shared pages count once overall (PSS
                 splits them); /dev/shm pages that no process maps (spilled or unmapped plasma) are not counted.
                 The sampling itself costs ~30 ms of CPU per sample with ~35 processes (~5% of one core).
    images/s     tim_ray_images_per_s(): from the event log, rows consumed by training per second over steps 2..N
                 (total images / total time, at log_every=1), with the data-wait share of those steps. It is bounded
                 by the model: the stream's own rate is the `stream` measurement above.
Then a table per size: first-step time and peak memory with their ratios against the smallest size (target: at
most 1.25x from 20k to 2M rows), training images/s and data-wait share, stream rows/s, stream and plain rows per
CPU-second and their ratio. A failed run prints its exit code and the tail of its stderr and stdout, and the next
size still runs. --work-dir keeps the run directories (stdout.log, stderr.log, events.jsonl, stream-*.log);
--skip-plain / --skip-stream skip those measurements; --tim-ray PATH picks the command. The runs inherit this
process's environment: PYTHONPATH=<a tim_ray export> measures another version of the code with the same venv.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

POOL_SIZE = 4096
ROW_GROUP = 1000
MIN_FILES = 4
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
           "cyan": (40, 200, 210), "pink": (240, 130, 180), "brown": (130, 80, 40), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "bar")


# ---------------------------------------------------------------------------------------------------- data sets
def _picture(rng: np.random.Generator, side: int) -> tuple[bytes, str]:
    names = list(COLOURS)
    top, bottom = rng.choice(len(names), 2, replace=False)
    ramp = np.linspace(0, 1, side)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, side)[None, :, None]
    field = (1 - ramp) * np.array(COLOURS[names[top]]) + ramp * np.array(COLOURS[names[bottom]])
    image = Image.fromarray(np.broadcast_to(field, (side, side, 3)).astype(np.uint8))
    draw, parts = ImageDraw.Draw(image), []
    for _ in range(int(rng.integers(1, 4))):
        colour, shape = names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(len(SHAPES)))]
        x0, y0 = rng.integers(0, side * 3 // 4, 2)
        size = int(rng.integers(side // 6, side // 2))
        box = [int(x0), int(y0), int(x0) + size, int(y0) + size]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        else:
            draw.rectangle([box[0], box[1], box[2], box[1] + max(2, size // 4)], fill=fill)
        parts.append(f"a {'small' if size < side // 3 else 'large'} {colour} {shape}")
    pixels = np.asarray(image).astype(np.int16)
    if rng.random() < 0.5:  # grain on half the pool: PNG sizes vary like real images do
        pixels = pixels + rng.integers(-6, 7, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    caption = f"{' and '.join(parts)} on a {names[top]} to {names[bottom]} gradient"
    return buffer.getvalue(), caption


def image_pool(side: int, count: int = POOL_SIZE, seed: int = 0) -> tuple[pa.Array, pa.Array]:
    rng = np.random.default_rng(seed)
    images, captions = zip(*(_picture(rng, side) for _ in range(count)))
    return pa.array(images, pa.binary()), pa.array(captions, pa.string())


def dataset(cache_dir: Path, rows: int, side: int, rows_per_file: int) -> Path:
    """The cached parquet directory of `rows` rows, written first if missing (into a .partial dir, then renamed)."""
    final = cache_dir / f"rows{rows}_side{side}_per{rows_per_file}"
    if (final / "_COMPLETE").is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    images, captions = image_pool(side)
    per_file = min(rows_per_file, math.ceil(rows / MIN_FILES))
    for index, first in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - first)
        picks = pa.array(np.random.default_rng(index + 1).integers(0, len(images), count))
        table = pa.table({"caption": captions.take(picks), "image": images.take(picks)})
        pq.write_table(table, partial / f"part-{index:05d}.parquet", row_group_size=ROW_GROUP,
                       use_dictionary=["caption"])
    (partial / "_COMPLETE").write_text(json.dumps({"rows": rows, "side": side, "per_file": per_file}))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    print(f"  wrote {rows} rows in {math.ceil(rows / per_file)} files to {final} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return final


def data_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.parquet"))


@dataclass
class Throughput:
    rows: int = 0
    wall_s: float = 0.0
    cpu_s: float | None = None  # CPU-seconds used meanwhile by every process doing the work

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.wall_s if self.wall_s else None

    @property
    def rows_per_cpu_s(self) -> float | None:
        return self.rows / self.cpu_s if self.cpu_s else None

    @property
    def cpus_used(self) -> float | None:
        return self.cpu_s / self.wall_s if self.cpu_s and self.wall_s else None


def plain_reader(root: Path, side: int, limit: int) -> Throughput:
    """pyarrow iter_batches + PIL decode + resize + numpy over the first `limit` rows, in this one process."""
    wall, cpu, rows = time.perf_counter(), time.process_time(), 0
    for path in data_files(root):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["image", "caption"]):
            for blob, _caption in zip(batch.column("image").to_pylist(), batch.column("caption").to_pylist()):
                if rows == limit:
                    return Throughput(rows, time.perf_counter() - wall, time.process_time() - cpu)
                with Image.open(io.BytesIO(blob)) as image:
                    np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC))
                rows += 1
    return Throughput(rows, time.perf_counter() - wall, time.process_time() - cpu)


# ----------------------------------------------------------------------------------- process-tree memory and CPU
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, str, int] | None:
    """(parent pid, start time, CPU ticks used: utime + stime) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[19], int(fields[11]) + int(fields[12])


def _mentions(pid: str, ray_tmp: str) -> bool:
    """Whether a process runs under `ray_tmp`: RAY_TMPDIR=ray_tmp in its environment, or a path below it (Ray's
    session directory) in its command line."""
    for name, needle in (("environ", f"RAY_TMPDIR={ray_tmp}\0"), ("cmdline", f"{ray_tmp}/")):
        try:
            if needle.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
        except OSError:
            pass
    return False


def pss_kib(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class TreeSampler:
    """Samples `root` + its descendants + every process under the Ray temp dir `tag` (see _mentions) every
    `interval_s`: the peak of their summed PSS (when `pss`) and each one's latest CPU ticks, kept after it exits."""
    root: int
    tag: str
    pss: bool = True
    interval_s: float = 0.5
    peak_kib: int = 0
    peak_processes: int = 0
    cpu_ticks: dict = field(default_factory=dict)  # (pid, start time) -> utime + stime at its latest sample
    _tagged: dict = field(default_factory=dict)  # (pid, start time) -> mentions the tag
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def members(self) -> dict[str, tuple[str, int]]:
        """pid -> (start time, CPU ticks) of every process sampled."""
        stats = {pid: s for pid in os.listdir("/proc") if pid.isdigit() and (s := _stat(pid)) is not None}
        children: dict[int, list[str]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [str(self.root)] if str(self.root) in stats else []
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo.extend(children.get(int(pid), []))
        for pid, (_, started, _) in stats.items():
            if pid not in tree and (pid, started) not in self._tagged:
                self._tagged[(pid, started)] = _mentions(pid, self.tag)
            if self._tagged.get((pid, started)):
                tree.add(pid)
        return {pid: stats[pid][1:] for pid in tree}

    def sample(self) -> None:
        with self._lock:
            processes = self.members()
            for pid, (started, ticks) in processes.items():
                self.cpu_ticks[(pid, started)] = ticks
            total = sum(pss_kib(pid) for pid in processes) if self.pss else 0
            if total > self.peak_kib:
                self.peak_kib, self.peak_processes = total, len(processes)

    def cpu_snapshot(self) -> dict:
        """Every sampled process's CPU ticks as of now."""
        self.sample()
        with self._lock:
            return dict(self.cpu_ticks)

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds_between(before: dict, after: dict) -> float:
    """CPU-seconds used between two cpu_snapshot()s (a process started in between counts from zero)."""
    return sum(ticks - before.get(key, 0) for key, ticks in after.items()) / CLOCK_TICKS


# ------------------------------------------------------------------------------------------------- tim-ray runs
@dataclass
class RunResult:
    rows: int
    exit_code: int | None = None
    wall_s: float = 0.0
    first_step_s: float | None = None
    loop_start_s: float | None = None
    data_open_s: float | None = None
    peak_pss_mib: float = 0.0
    processes_at_peak: int = 0
    images_per_s: float | None = None
    data_wait_share: float | None = None
    data_report: dict | None = None
    failure: str = ""


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tim_ray_images_per_s(events: list[dict]) -> tuple[float | None, float | None]:
    """Images/s consumed by training over the metrics windows after step 1, and the data-wait share of that time.

    With train.log_every=1 every window is one step of the same global batch, so total images / total time is the
    harmonic mean of the windows' images_per_s, and each window's time is proportional to 1/images_per_s (the
    weight of its data_wait_share). Step 1 is left out: its window includes the pipeline's start."""
    windows = [e for e in events if e.get("event") == "metrics" and e.get("step", 0) >= 2 and e.get("images_per_s")]
    if not windows:
        return None, None
    times = [1 / e["images_per_s"] for e in windows]
    rate = len(windows) / sum(times)
    wait = sum(t * e.get("data_wait_share", 0.0) for t, e in zip(times, windows)) / sum(times)
    return rate, wait


def _tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop_run(proc: subprocess.Popen, sampler: TreeSampler) -> None:
    """SIGTERM to the run's session (tim-ray saves and stops on it), SIGKILL after 30 s; then SIGKILL to any
    process of this run that outlived it (a Ray daemon in its own session), each by PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in sampler.members():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def _watch_stdout(proc: subprocess.Popen, log: Path, marks: dict, t0: float) -> threading.Thread:
    """Copies the run's stdout to `log`, noting when the driver reports its data opened."""
    def pump() -> None:
        with open(log, "w") as out:
            for line in proc.stdout:
                out.write(line)
                if "source rows in" in line and "data_open" not in marks:
                    marks["data_open"] = time.time() - t0
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def run_train(tim_ray: str, data_dir: Path, rows: int, work: Path, steps: int, side: int, timeout_s: float,
              overrides: list[str]) -> RunResult:
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="tsb", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    name = f"scale{rows}"
    command = [tim_ray, "train", "data.source=parquet", f"data.path='{data_dir}'", f"data.height={side}",
               f"data.width={side}", f"train.steps={steps}", "train.log_every=1", f"train.name={name}",
               f"train.output_dir='{work / 'runs'}'", "train.eval_every=1000000", "checkpoint.every=1000000",
               "eval.nfe=[1]", "tracking.enabled=false", *overrides]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    result, marks = RunResult(rows=rows), {}
    print(f"  $ {' '.join(command)}", flush=True)
    t0 = time.time()
    with open(work / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    pump = _watch_stdout(proc, work / "stdout.log", marks, t0)
    with TreeSampler(proc.pid, str(ray_tmp)) as sampler:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result.failure = f"timed out after {timeout_s:.0f} s"
        finally:
            _stop_run(proc, sampler)
    pump.join(timeout=10)
    result.exit_code, result.wall_s = proc.returncode, time.time() - t0
    result.peak_pss_mib, result.processes_at_peak = sampler.peak_kib / 1024, sampler.peak_processes
    result.data_open_s = marks.get("data_open")
    events = read_events(work / "runs" / name)
    steps_done = [e for e in events if e.get("event") == "metrics"]
    starts = [e for e in events if e.get("event") == "start"]
    result.first_step_s = steps_done[0]["time"] - t0 if steps_done else None
    result.loop_start_s = starts[0]["time"] - t0 if starts else None
    result.images_per_s, result.data_wait_share = tim_ray_images_per_s(events)
    report_event = next((e for e in events if e.get("event") == "data"), None)
    result.data_report = {k: v for k, v in report_event.items() if k not in ("time", "event")} if report_event else None
    if result.exit_code != 0 or result.first_step_s is None:
        seen = "seen" if steps_done else "not seen"
        result.failure = result.failure or f"exit code {result.exit_code}, first step {seen}"
        print(f"  tim-ray train FAILED ({result.failure}). stderr tail:\n{_tail(work / 'stderr.log')}\n"
              f"  stdout tail:\n{_tail(work / 'stdout.log', 15)}", flush=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ stream alone
STREAM_BATCH = 256
STREAM_START, STREAM_END, STREAM_RESULT = "stream: measuring", "stream: measured", "stream result: "


def probe_stream(root: Path, rows: int, side: int, overrides: list[str]) -> None:
    """The stream subprocess (--probe-stream): open the set keeping its first `rows` rows, warm Ray's workers up
    on a short epoch, then stream one whole epoch (nothing left in flight at the end), printing the markers
    between which measure_stream counts CPU time, then the result as JSON."""
    import ray

    from tim_ray.config import load_config
    from tim_ray.data import open_training_data, rank_batches, window_cache

    cfg = load_config(overrides=[*overrides, "data.source=parquet", f"data.path='{root}'", f"data.height={side}",
                                 f"data.width={side}", f"data.max_samples={rows}", "model.conditioning=class",
                                 "model.codec=pixel"])
    started = time.perf_counter()
    data = open_training_data(cfg)  # every footer is read; the units of the first `rows` rows are kept
    opened = time.perf_counter()
    ray.init(address="local", num_cpus=cfg.ray.local_num_cpus, include_dashboard=False, log_to_driver=False)
    cache = window_cache(data)
    for _ in rank_batches(data, 0, 0, STREAM_BATCH, 0, 1, cache):  # epoch 0 starts every worker the stream uses
        pass
    warmed = time.perf_counter()
    print(STREAM_START, flush=True)
    begin = time.perf_counter()
    done = sum(len(batch["sample_id"]) for batch, _ in rank_batches(data, 1, 0, STREAM_BATCH, 0, 1, cache))
    end = time.perf_counter()
    print(STREAM_END, flush=True)
    print(STREAM_RESULT + json.dumps({"open_s": opened - started, "warm_up_s": warmed - opened, "rows": done,
                                      "wall_s": end - begin, "units": len(data.units),
                                      "windows": data.layout(0).num_windows, "ray_cpus": cfg.ray.local_num_cpus}),
          flush=True)
    ray.shutdown()


def measure_stream(root: Path, rows: int, side: int, work: Path, timeout_s: float,
                   overrides: list[str]) -> tuple[Throughput, dict]:
    """probe_stream in a subprocess (own session and RAY_TMPDIR, killed after timeout_s): its measured epoch's rows
    and wall time, and the CPU-seconds its process tree and Ray processes used between its markers."""
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="tss", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    command = [sys.executable, __file__, "--probe-stream", str(root), "--stream-rows", str(rows), "--side", str(side),
               *(f"--set={o}" for o in overrides)]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    snapshots, info = [], {}
    with open(work / "stream-stderr.log", "w") as stderr, open(work / "stream-stdout.log", "w") as stdout:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        watchdog = threading.Timer(timeout_s, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        with TreeSampler(proc.pid, str(ray_tmp), pss=False) as sampler:
            try:
                for line in proc.stdout:
                    stdout.write(line)
                    if line.startswith((STREAM_START, STREAM_END)):
                        snapshots.append(sampler.cpu_snapshot())
                    elif line.startswith(STREAM_RESULT):
                        info = json.loads(line[len(STREAM_RESULT):])
                proc.wait()
            finally:
                watchdog.cancel()
                _stop_run(proc, sampler)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if len(snapshots) != 2 or not info:
        print(f"  stream FAILED (exit code {proc.returncode}). stderr tail:\n{_tail(work / 'stream-stderr.log')}",
              flush=True)
        return Throughput(), info
    return Throughput(info["rows"], info["wall_s"], cpu_seconds_between(*snapshots)), info


# ------------------------------------------------------------------------------------------------------ report
def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value, base) -> float | None:
    return value / base if value and base else None


def report(results: list[RunResult], plain: dict[int, Throughput], stream: dict[int, Throughput],
           sizes_mib: dict[int, float], cores: int) -> None:
    base = results[0]
    print(f"\n{'rows':>9} {'data MiB':>8} {'first step s':>12} {'x':>5} {'peak PSS MiB':>12} {'x':>5} "
          f"{'train img/s':>11} {'data wait':>9} {'stream rows/s':>13} {'CPUs':>4} {'stream rows/CPU-s':>17} "
          f"{'plain rows/CPU-s':>16} {'stream/plain':>12}  status")
    for r in results:
        s, p = stream.get(r.rows, Throughput()), plain[r.rows]
        print(f"{r.rows:>9} {sizes_mib[r.rows]:>8.0f} {_fmt(r.first_step_s):>12} "
              f"{_fmt(_ratio(r.first_step_s, base.first_step_s), '.2f'):>5} {r.peak_pss_mib:>12.0f} "
              f"{_fmt(_ratio(r.peak_pss_mib, base.peak_pss_mib), '.2f'):>5} {_fmt(r.images_per_s):>11} "
              f"{_fmt(r.data_wait_share, '.0%'):>9} {_fmt(s.rows_per_s, '.0f'):>13} {_fmt(s.cpus_used):>4} "
              f"{_fmt(s.rows_per_cpu_s, '.0f'):>17} {_fmt(p.rows_per_cpu_s, '.0f'):>16} "
              f"{_fmt(_ratio(s.rows_per_cpu_s, p.rows_per_cpu_s), '.2f'):>12}  {r.failure or 'ok'}")
    print(f"x: against {base.rows} rows (target: at most 1.25x). data wait: share of training step time, steps 2+.\n"
          "stream: one epoch of rank_batches alone (one rank) after a warm-up; CPUs: the CPU-seconds it used, its\n"
          f"Ray processes included, per wall second, on {cores} cores (Ray given ray.local_num_cpus logical CPUs).\n"
          "stream/plain: rows per CPU-second against the single-process plain reader's (target: at least 0.9x).")
    for r in results[1:]:
        first, memory = _ratio(r.first_step_s, base.first_step_s), _ratio(r.peak_pss_mib, base.peak_pss_mib)
        verdict = "within" if first and memory and max(first, memory) <= 1.25 else "OVER or unknown"
        print(f"  {r.rows:>9} rows: first step {_fmt(first, '.2f')}x, peak PSS {_fmt(memory, '.2f')}x ({verdict})")
    for rows, s in stream.items():
        ratio = _ratio(s.rows_per_cpu_s, plain[rows].rows_per_cpu_s)
        verdict = "meets" if ratio and ratio >= 0.9 else "BELOW or unknown"
        print(f"  {rows:>9} rows: stream {_fmt(ratio, '.2f')}x the plain reader per CPU-second ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000,2000000", help="comma-separated row counts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stream-rows", type=int, default=20000,
                        help="rows the stream and the plain reader handle per size (all of a smaller set)")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--rows-per-file", type=int, default=50000)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tim-ray" / "bench-data-scale")
    parser.add_argument("--work-dir", type=Path, default=None, help="run directories (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per tim-ray run and per stream run")
    parser.add_argument("--tim-ray", default=str(Path(sys.executable).with_name("tim-ray")))
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain reader")
    parser.add_argument("--skip-stream", action="store_true", help="skip the stream measurement")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an extra override for tim-ray train and the stream, e.g. data.decode_tasks=4")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--probe-stream", type=Path, default=None, help=argparse.SUPPRESS)  # measure_stream's child
    args = parser.parse_args()
    if args.probe_stream:
        probe_stream(args.probe_stream, args.stream_rows, args.side, args.set)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cores = os.cpu_count() or 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="data_scale_"))
    print(f"data scale benchmark: sizes {sizes}, {args.steps} steps, {args.stream_rows} stream rows, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}, cache {args.cache_dir}, runs in {work}", flush=True)
    results, plain, stream, sizes_mib = [], {}, {}, {}
    try:
        for rows in sizes:
            print(f"\n== {rows} rows", flush=True)
            root = dataset(args.cache_dir, rows, args.side, args.rows_per_file)
            sizes_mib[rows] = sum(p.stat().st_size for p in data_files(root)) / 2**20
            plain[rows] = Throughput() if args.skip_plain else plain_reader(root, args.side, args.stream_rows)
            p = plain[rows]
            print(f"  plain reader: {p.rows} rows, {_fmt(p.rows_per_s, '.0f')} rows/s, "
                  f"{_fmt(p.rows_per_cpu_s, '.0f')} rows/CPU-s", flush=True)
            if not args.skip_stream:
                stream[rows], info = measure_stream(root, args.stream_rows, args.side, work / f"rows{rows}",
                                                    args.timeout, args.set)
                s = stream[rows]
                print(f"  stream: {s.rows} rows, {_fmt(s.rows_per_s, '.0f')} rows/s, {_fmt(s.cpu_s)} CPU-s "
                      f"({_fmt(s.cpus_used)} CPUs), {_fmt(s.rows_per_cpu_s, '.0f')} rows/CPU-s; open "
                      f"{_fmt(info.get('open_s'), '.2f')} s, Ray start + warm-up {_fmt(info.get('warm_up_s'))} s; "
                      f"{info.get('units')} units, {info.get('windows')} windows, Ray with {info.get('ray_cpus')} "
                      "logical CPUs", flush=True)
            results.append(run_train(args.tim_ray, root, rows, work / f"rows{rows}", args.steps, args.side,
                                     args.timeout, args.set))
            r = results[-1]
            print(f"  tim-ray: data open {_fmt(r.data_open_s)} s, loop start {_fmt(r.loop_start_s)} s, first step "
                  f"{_fmt(r.first_step_s)} s, peak PSS {r.peak_pss_mib:.0f} MiB ({r.processes_at_peak} processes), "
                  f"{_fmt(r.images_per_s)} images/s, data wait {_fmt(r.data_wait_share, '.0%')}, wall "
                  f"{r.wall_s:.0f} s; data report: {r.data_report}", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(results, plain, stream, sizes_mib, cores)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine skew every figure)")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "cores": cores,
                                         "plain": {rows: asdict(t) for rows, t in plain.items()},
                                         "stream": {rows: asdict(t) for rows, t in stream.items()},
                                         "data_mib": sizes_mib}, indent=1))


if __name__ == "__main__":
    main()
