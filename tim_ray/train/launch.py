"""The driver side of `tim-ray train`: start or join Ray, open the MLflow run, launch the Ray Train run, report.

The run directory is <train.output_dir>/<train.name>; Ray Train persists checkpoints under
<ray.storage_path or train.output_dir>/<train.name>/checkpoint_<step>, so running the same name again resumes it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tim_ray.artifacts.checkpoint import DCP_DIR, STATE_FILE, read_state
from tim_ray.artifacts.checkpoints_on_disk import checkpoint_dirs, newest_verified, verify_checkpoint
from tim_ray.config import ConfigError, Config, Derived, dump_toml, to_dict
from tim_ray.tracking import Tracker, adopt_local_store, tracking_uri
from tim_ray.train.faults import ENV_VAR as FAULTS_ENV
from tim_ray.train.init_from import prepare_init
from tim_ray.train.metrics import duration
from tim_ray.train.publish import publish_export
from tim_ray.train.stop import DriverConsole, job_stop_warning, new_run_control, on_stop_signals

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class ResumeError(ConfigError):
    """A resume request that cannot be honoured (exit 2)."""


def run_dir_of(cfg: Config) -> Path:
    return (Path(cfg.train.output_dir) / cfg.train.name).resolve()


def storage_root(cfg: Config) -> str:
    return cfg.ray.storage_path or str(Path(cfg.train.output_dir).resolve())


def _local_run_storage(cfg: Config) -> Path | None:
    """Where Ray Train persists this run's checkpoints, when that is a local (or mounted) path."""
    return None if "://" in storage_root(cfg) else Path(storage_root(cfg)) / cfg.train.name


def latest_checkpoint(cfg: Config) -> str | None:
    """The checkpoint this run continues from with --resume auto: its newest complete and verified checkpoint on
    local storage, registered by Ray or not (tim_ray.artifacts.checkpoints_on_disk, the rule that sample, eval and
    export share); None if there is none, or the storage is remote."""
    run = _local_run_storage(cfg)
    found = newest_verified(run) if run is not None else None
    return str(found) if found else None


def _registered(cfg: Config) -> list[str]:
    """The checkpoint directory names in Ray's registry of this run (its checkpoint manager snapshot)."""
    run = _local_run_storage(cfg)
    snapshot = run / RAY_SNAPSHOT if run is not None else None
    if snapshot is None or not snapshot.is_file():
        return []
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ResumeError(f"{snapshot} is corrupt ({exc}); move it away (the run then continues from its newest "
                          f"verified checkpoint)") from None


def resolve_resume(cfg: Config, resume: str) -> str | None:
    """`auto`: continue this run from its newest verified checkpoint (the worker finds it); `never`: refuse a run
    that has checkpoint directories; PATH: start from that checkpoint, verified here (CheckpointError, exit 1, if
    its files do not match their checksums). Returns the explicit checkpoint to start from, if any."""
    _registered(cfg)  # a corrupt registry would fail inside Ray with a traceback: one line here instead
    if resume == "auto":
        return None
    if resume == "never":
        run = _local_run_storage(cfg)
        existing = checkpoint_dirs(run) if run is not None else []
        if existing:
            raise ResumeError(f"run '{cfg.train.name}' already has checkpoints ({existing[0]}); use --resume auto "
                              f"to continue it or choose another train.name")
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file() or not (path / DCP_DIR).is_dir():
        raise ResumeError(f"--resume {resume}: not a tim-ray checkpoint directory (no {STATE_FILE} or {DCP_DIR}/)")
    verify_checkpoint(path)  # a changed, truncated or missing file: CheckpointError naming it
    read_state(str(path))
    return str(path.resolve())


def set_aside_stale_registry(cfg: Config) -> str | None:
    """If Ray's registry names a checkpoint directory that is gone (a damaged one moved away), Ray would refuse to
    start the run (CheckpointManagerInitializationError). Rename the registry aside instead, so the run continues
    from its newest verified checkpoint on disk. Returns a line saying what was done, or None."""
    run = _local_run_storage(cfg)
    gone = [name for name in _registered(cfg) if not (run / name).is_dir()]
    if not gone:
        return None
    aside = run / f"{RAY_SNAPSHOT}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    (run / RAY_SNAPSHOT).rename(aside)
    return (f"Ray's checkpoint registry names {', '.join(gone)}, which is gone; set it aside as {aside.name} (the "
            f"run continues from its newest verified checkpoint; Ray's checkpoint.keep counts from there)")


def scaling_config(cfg: Config):
    import ray.train

    workers = (cfg.ray.min_workers, cfg.ray.num_workers) if cfg.ray.min_workers else cfg.ray.num_workers
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                   resources_per_worker={"CPU": cfg.ray.cpus_per_worker,
                                                         **({"GPU": 1} if cfg.ray.use_gpu else {})},
                                   elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_check_s)


def build_trainer(cfg: Config, run_dir: Path, tracker, data, *, start_from: str | None = None, control=None,
                  faults: str = "", callbacks: tuple = (), init=None):
    """The TorchTrainer of one training run (`tim-ray train`, and each trial of `tim-ray tune`): the worker loop
    with its config, run directory, MLflow run, prepared data, RunControl actor and fault plan; scaling, retries
    and checkpoint retention from cfg; Ray Train's storage under cfg's output directory. `init`: an object ref to
    the --init-from weights (tim_ray.train.init_from)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from tim_ray.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "start_from": start_from,
                           "mlflow": [tracker.uri, tracker.run_id], "data": ray.put(data), "control": control,
                           "faults": faults, "init": init},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.train.name, storage_path=storage_root(cfg), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )


def ray_target(cfg: Config, address: str | None) -> str | None:
    """The cluster to join: `address`, else ray.address, else RAY_ADDRESS (set inside a submitted Ray job); None =
    start a local Ray."""
    return address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def resources_needed(cfg: Config) -> dict[str, dict[str, float]]:
    """What a training run holds at once, at its smallest (ray.min_workers of an elastic run), per resource and
    holder: each worker's CPUs (and one GPU with ray.use_gpu), the encoder actors of each rank's data pipeline
    (text, and a latent codec, unless the data is precomputed), and one CPU for the data tasks (window reads,
    batch decodes), which never schedule without it: the run would wait forever."""
    from tim_ray.data.encode import EncoderSpec

    workers = cfg.ray.min_workers or cfg.ray.num_workers
    spec = EncoderSpec.of(cfg)
    actors = 0 if cfg.data.precomputed else workers * (spec.text + spec.latent) * cfg.data.encode_actors
    return {"CPU": {"the workers": workers * cfg.ray.cpus_per_worker, "encoder actors": actors * cfg.data.encode_cpus,
                    "data tasks": 1},
            "GPU": {"the workers": workers * cfg.ray.use_gpu, "encoder actors": actors * cfg.data.encode_gpus}}


def local_ray_resources(cfg: Config) -> dict[str, float]:
    """What the local Ray that start_ray starts will have: ray.local_num_cpus, and the GPUs Ray detects (the
    CUDA devices this process sees)."""
    import torch

    return {"CPU": cfg.ray.local_num_cpus, "GPU": torch.cuda.device_count()}


def resource_shortfall(cfg: Config, available: dict[str, float], where: str) -> tuple[str, str] | None:
    """(resource, one line saying what the run needs of it and `where` lacks), or None if the run fits."""
    for kind, holders in resources_needed(cfg).items():
        need = sum(holders.values())
        if need > available.get(kind, 0):
            workers = f"ray.min_workers = {cfg.ray.min_workers}" if cfg.ray.min_workers else \
                f"ray.num_workers = {cfg.ray.num_workers}"
            parts = ", ".join(f"{amount:g} for {holder}" for holder, amount in holders.items() if amount)
            return kind, (f"{workers} needs {need:g} {kind}s ({parts}), but {where} has "
                          f"{available.get(kind, 0):g}")
    return None


def check_local_fit(cfg: Config, address: str | None) -> None:
    """A ConfigError (exit 2) if the run cannot fit the local Ray it would start: without this it waits forever.
    Nothing to check when this process is connected to a Ray already (a notebook, a test): launch checks that one
    once connected."""
    import ray

    if ray_target(cfg, address) is not None or ray.is_initialized():
        return
    short = resource_shortfall(cfg, local_ray_resources(cfg), "a local Ray")
    if short is not None:
        kind, problem = short
        fix = ("lower ray.num_workers, ray.cpus_per_worker or data.encode_cpus, or raise ray.local_num_cpus"
               if kind == "CPU" else "lower ray.num_workers or data.encode_gpus, or set ray.use_gpu = false")
        raise ConfigError(f"{problem}; {fix}")


def start_ray(cfg: Config, address: str | None, verbose: bool = False) -> str:
    """Join `address` (or RAY_ADDRESS, set inside a submitted Ray job) or start a local Ray with logical CPUs.
    The one place where train, tune and precompute connect to Ray, and so where what they show of Ray's output is
    set (tim_ray.ray_output): by default tim-ray's own lines only, Ray's (worker logs, "(raylet)" messages, Ray
    Data's progress, INFO lines) left in Ray's log files under <temp dir>/session_latest/logs; verbose=True shows
    them as Ray prints them."""
    import ray

    from tim_ray.ray_output import quiet_ray_output

    if ray.is_initialized():  # a caller (a notebook, a test) already connected this process
        return "using the Ray this process is connected to"
    output = quiet_ray_output(verbose)
    target = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **output)
        return f"joined the Ray cluster at {target}"
    # Oversubscribed logical CPUs: on a 2-core machine Ray Train's workers would otherwise starve Ray Data.
    # address="local": a new instance even when a `ray start` cluster runs on this machine (a bare ray.init would
    # attach to it and then refuse num_cpus).
    ray.init(address="local", num_cpus=cfg.ray.local_num_cpus, **output)
    return f"started a local Ray ({cfg.ray.local_num_cpus} logical CPUs)"


def launch(cfg: Config, address: str | None = None, resume: str = "auto", init_from: str | None = None,
           init_ema: bool | None = None, verbose: bool = False) -> int:
    import ray.train

    from tim_ray.data.batches import open_training_data

    start_from = resolve_resume(cfg, resume)
    if (set_aside := set_aside_stale_registry(cfg)) is not None:
        print(f"tim-ray train: {set_aside}", flush=True)
    check_local_fit(cfg, address)
    data = open_training_data(cfg)  # metadata only, before Ray starts or anything is written: fails in seconds
    init = prepare_init(cfg, init_from, init_ema) if init_from else None  # likewise: a misfit fails now
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    resuming = latest_checkpoint(cfg) is not None
    if not cfg.tracking.uri and (moved_from := adopt_local_store(run_dir)) is not None:
        print(f"tim-ray train: this run directory was copied or moved from {moved_from}; its MLflow store now "
              f"keeps artifacts in {run_dir}", flush=True)
    print(f"tim-ray train: {data.describe()}; rejected rows are counted as they stream (listed in "
          f"{run_dir / cfg.data.rejects_file} at the end)", flush=True)
    print(f"tim-ray train: {start_ray(cfg, address, verbose)}", flush=True)
    # A joined cluster may grow (an autoscaler adds nodes for pending workers), so a shortfall there is a warning.
    if (short := resource_shortfall(cfg, ray.cluster_resources(), "the Ray cluster now")) is not None:
        print(f"tim-ray train: warning: {short[1]}; the run waits until the cluster grows", file=sys.stderr,
              flush=True)
    tracker = Tracker.for_launch(cfg, run_dir)
    for line in init.announce(tracker) if init else ():
        print(f"tim-ray train: {line}", flush=True)
    restarted = (f", restarted from run {tracker.previous_run_id}: {tracker.previous_status}"
                 if tracker.previous_run_id else "")
    derived = Derived.of(cfg)
    print(f"tim-ray train:\n  run directory: {run_dir}\n  checkpoints:   {storage_root(cfg)}/{cfg.train.name}"
          f"\n  mlflow:        {tracking_uri(cfg, run_dir) if tracker.enabled else 'off'}"
          f"{f' (run {tracker.run_id})' if tracker.enabled else ''}"
          f"{restarted}"
          f"\n  global batch {derived.global_batch}, lr {derived.lr:g}, {cfg.train.steps} steps"
          f"{', resuming' if resuming else ''}{f', starting from {start_from}' if start_from else ''}", flush=True)
    control = new_run_control()
    on_stop_signals(control)
    if (warning := job_stop_warning()) is not None:
        print(f"tim-ray train: warning: {warning}", file=sys.stderr, flush=True)
    trainer = build_trainer(cfg, run_dir, tracker, data, start_from=start_from, control=control,
                            faults=os.environ.get(FAULTS_ENV, ""), init=ray.put(init.tensors) if init else None)
    first_step = _step_of(start_from or latest_checkpoint(cfg))
    console = DriverConsole(control, first_step, cfg.train.steps, terminal=sys.stdout.isatty())
    started = time.monotonic()
    failure = None
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        failure = exc
    finally:
        summary = console.close()  # the workers' last lines before anything the driver says next
    if failure is not None:
        tracker.finish("FAILED")
        print(f"tim-ray train: failed after {cfg.ray.max_failures} restart(s): {_root_cause(failure)}\n"
              f"  newest verified checkpoint: {latest_checkpoint(cfg) or 'none'} (run the same command to resume)",
              file=sys.stderr, flush=True)
        return 1
    outcome = result.return_value or {"status": "finished", "step": None, "message": ""}
    last = result.checkpoint.path if result.checkpoint else "none"
    if outcome["status"] == "bad_config":
        tracker.finish("FAILED")
        print(f"tim-ray train: {outcome['message']}", file=sys.stderr, flush=True)
        return 2
    if outcome["status"] in ("nonfinite", "bad_checkpoint"):
        tracker.finish("FAILED")
        what = "could not resume" if outcome["status"] == "bad_checkpoint" else f"stopped at step {outcome['step']}"
        print(f"tim-ray train: {what}: {outcome['message']}\n"
              f"  newest verified checkpoint: {latest_checkpoint(cfg) or 'none'}", file=sys.stderr, flush=True)
        return 1
    tracker.finish("KILLED" if outcome["status"] == "stopped" else "FINISHED")
    if outcome["status"] == "stopped":
        print(f"tim-ray train: stopped at step {outcome['step']} ({outcome['message']}); checkpoint {last}\n"
              f"  run the same command to continue", flush=True)
        return 0
    export = publish_export(cfg, run_dir, tracker, result.checkpoint)
    print(run_summary(cfg, run_dir, tracker, summary, time.monotonic() - started, last, export), flush=True)
    return 0


def run_summary(cfg: Config, run_dir: Path, tracker, summary: dict, seconds: float, checkpoint: str,
                export: str) -> str:
    """The end of a finished run, for the person who started it: what was done, how fast, and where it all is."""
    lines = [f"tim-ray train: done in {duration(seconds)}"]
    if summary:
        data = summary["data"]
        rejected = data.get("rejected_rows_listed", data.get("rejected_at_precompute"))
        where = (f" (listed in {run_dir / cfg.data.rejects_file})" if "rejected_rows_listed" in data
                 else " (at precompute)")
        loss = summary["loss"]
        lines += [f"  steps:         {summary['start_step']} -> {summary['step']} of {cfg.train.steps} in "
                  f"{duration(summary['train_seconds'])}, {summary['images_per_s']:.4g} images/s",
                  f"  final loss:    {'n/a' if loss is None else f'{loss:.4g}'}",
                  f"  rejected rows: {'n/a' if rejected is None else f'{rejected}{where}'}"]
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    lines += [f"  checkpoint:    {checkpoint}",
              f"  sample grids:  {run_dir / 'samples'}{f' (newest {grids[-1].name})' if grids else ''}",
              f"  export:        {export}"]
    if tracker.enabled:
        lines += [f"  mlflow run:    {tracker.run_id} in {tracker.uri}",
                  f"  browse:        {tracker.browse_hint()}"]
    return "\n".join(lines)


def _step_of(checkpoint: str | None) -> int:
    return read_state(checkpoint)[0].step if checkpoint else 0


def _root_cause(exc: BaseException) -> str:
    """The first worker's (or the controller's) error of a failed run, as one line."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    exc = getattr(exc, "controller_failure", exc)
    while getattr(exc, "cause", None) is not None:  # a RayTaskError wraps the user's exception
        exc = exc.cause
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
