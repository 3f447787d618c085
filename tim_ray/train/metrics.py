"""What a training run tells the world: progress lines, a JSON-lines event log, MLflow metrics and sample grids.

Metrics are averaged over ranks (one small all-reduce every `train.log_every` steps, which every rank joins); rank 0
writes `events.jsonl` in the run directory, logs to MLflow through `tim_ray.tracking.Tracker` and hands its lines
(one progress line per `train.log_every` steps: step/total, loss, images/s, ETA) and its end-of-run summary to the
driver through the RunControl. The first worker of each node logs MLflow's system metrics.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tim_ray.config import Config, Derived
from tim_ray.eval.grid import grid_image, sample_rows
from tim_ray.tracking import Tracker
from tim_ray.train.stop import tell_driver

SHOWN = ("loss", "mse", "transition", "consistency", "diffusion", "grad_norm", "lr", "data_wait_share")


def duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total: int, start_step: int, elapsed: float, images_per_s: float,
                  metrics: dict[str, float]) -> str:
    """'step 50/400 (12%)  812 img/s  ETA 3m05s  loss 0.2142  mse ...': the ETA from this launch's pace so far."""
    done = step - start_step
    eta = duration((total - step) * elapsed / done) if done > 0 and step < total else "0s"
    shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in SHOWN if k in metrics)
    return f"step {step}/{total} ({100 * step // total}%)  {images_per_s:.4g} img/s  ETA {eta}  {shown}"


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20  # CPU: resident set size of this worker


class RunLog:
    def __init__(self, cfg: Config, run_dir: Path, rank: int, world: int, tracker_ids: list, control=None):
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.control = control if rank == 0 else None  # the driver's RunControl: what the driver prints
        self.tracker = Tracker(*tracker_ids) if rank == 0 else Tracker(None, None)
        self._tracker_ids = tracker_ids
        self._system_metrics = contextlib.ExitStack()
        self.lr = Derived.of(cfg, world_size=world).lr
        self.global_batch = Derived.of(cfg, world_size=world).global_batch
        self._sums: dict[str, float] = {}
        self._count = self._skipped = 0
        self._wait = self._busy = 0.0
        self._window_start = time.perf_counter()
        self._latest: dict[str, float] = {}
        self._device = torch.device("cpu")
        self._launch_start, self._start_step, self._images = time.perf_counter(), 0, 0

    def _event(self, kind: str, **fields) -> None:
        if self.rank == 0:
            with open(self.run_dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")

    def _say(self, text: str) -> None:
        if self.rank == 0:
            tell_driver(self.control, text, self.cfg.train.name)

    def start(self, state, model) -> None:
        import ray.train

        ctx = ray.train.get_context()
        if ctx.get_local_rank() == 0:  # one monitor per node, each with its own metric names
            self._system_metrics.enter_context(Tracker(*self._tracker_ids).system_metrics(ctx.get_node_rank()))
        self._device = next(model.parameters()).device
        self._launch_start, self._start_step = time.perf_counter(), state.step
        n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global count
        begin = "resuming at" if state.step else "starting at"
        self._say(f"{begin} step {state.step}/{self.cfg.train.steps}: {n_params / 1e6:.2f}M parameters, "
                  f"{self.world} worker(s), global batch {self.global_batch}, lr {self.lr:g}")
        self._event("start", step=state.step, params=n_params, world_size=self.world, lr=self.lr)

    def step(self, state, result, data_wait: float, compute: float) -> None:
        if self.control is not None:
            self.control.report_step.remote(state.step)
        self._count += 1
        self._skipped += int(result.skipped)
        self._images += self.global_batch
        self._wait += data_wait
        self._busy += data_wait + compute
        for name, value in {**result.metrics, "grad_norm": result.grad_norm}.items():
            if math.isfinite(value):
                self._sums[name] = self._sums.get(name, 0.0) + value
        if state.step % self.cfg.train.log_every == 0 or state.step == self.cfg.train.steps:
            self._flush(state)

    def _flush(self, state) -> None:
        names = sorted(self._sums)
        values = torch.tensor([self._sums[n] / self._count for n in names] + [self._skipped], dtype=torch.float64)
        if dist.is_initialized():  # every rank skips the same steps, so the mean of the skip count is the count
            dist.all_reduce(values)
            values /= self.world
        elapsed = time.perf_counter() - self._window_start
        metrics = dict(zip(names, values[:-1].tolist()))
        metrics.update(lr=self.lr, skipped_steps=values[-1].item(), images_per_s=self._count * self.global_batch /
                       elapsed, data_wait_share=self._wait / max(self._busy, 1e-9),
                       peak_memory_mib=peak_memory_mib(self._device))
        self._latest = {"step": state.step, **metrics}
        self._say(progress_line(state.step, self.cfg.train.steps, self._start_step,
                                time.perf_counter() - self._launch_start, metrics["images_per_s"], metrics))
        self._event("metrics", step=state.step, **metrics)
        self.tracker.log_metrics(metrics, step=state.step)
        self._sums, self._count, self._skipped, self._wait, self._busy = {}, 0, 0, 0.0, 0.0
        self._window_start = time.perf_counter()

    def latest_metrics(self) -> dict:
        return dict(self._latest)

    def sample_grid(self, state, model, ema, feed, path) -> None:
        """Every rank runs the sampler (the sharded model needs all of them); rank 0 saves and logs the grid."""
        cond, uncond, names = feed.grid_conditions()
        shape = (len(names), *feed.sample_shape)
        nfe_list = self.cfg.eval.nfe
        with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
            rows = sample_rows(model, cond, uncond, shape, nfe_list, path, self.cfg.sample, self.cfg.sample.seed,
                               decode=feed.decode)
        if self.rank != 0:
            return
        image = grid_image(rows, [f"{n} NFE" for n in nfe_list])
        out = self.run_dir / "samples" / f"step_{state.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        (self.run_dir / "samples" / "columns.txt").write_text("\n".join(names) + "\n")
        self.tracker.log_image(image, key="samples", step=state.step)
        self._say(f"samples at NFE {nfe_list} ({'EMA' if ema else 'raw'} weights): {out}")
        self._event("samples", step=state.step, path=str(out), nfe=nfe_list)

    def epoch_rejects(self, epoch: int, counts: dict[str, int], step: int) -> None:
        """An epoch's rejected rows over all ranks, by reason: a line, an event and MLflow metrics."""
        total = sum(counts.values())
        self._say(f"epoch {epoch} done at step {step}: {total} rejected rows{f' {json.dumps(counts)}' if total else ''}")
        self._event("epoch_rejects", step=step, epoch=epoch, rejected=total, by_reason=counts)
        self.tracker.log_metrics({"data.epoch_rejected": total,
                                  **{f"data.epoch_rejected.{reason}": n for reason, n in counts.items()}}, step=step)

    def finish(self, state, data_report: dict | None = None, outcome: str = "finished") -> None:
        if data_report:
            self._say(f"data: {json.dumps(data_report)}")
            self._event("data", **data_report)
            self.tracker.log_metrics({f"data.{k}": v for k, v in data_report.items()
                                      if isinstance(v, (int, float))}, step=state.step)
        self._say(f"{outcome} at step {state.step}")
        self._event("finish", step=state.step, outcome=outcome)
        self.tracker.log_file(self.run_dir / "events.jsonl")
        self._system_metrics.close()
        seconds = time.perf_counter() - self._launch_start
        if self.control is not None:
            import ray

            summary = {"start_step": self._start_step, "step": state.step, "train_seconds": seconds,
                       "images_per_s": self._images / max(seconds, 1e-9), "loss": self._latest.get("loss"),
                       "data": data_report or {}}
            try:  # waited for: the actor runs this caller's calls in order, so every line said is delivered too
                ray.get(self.control.record_summary.remote(summary), timeout=30)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass  # the driver is gone; nobody is left to print the summary
