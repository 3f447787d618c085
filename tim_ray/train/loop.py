"""The Ray Train worker: build, shard, (resume,) train, log, sample, checkpoint. One function per phase."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tim_ray.artifacts.checkpoint import CheckpointError, TrainState, load_checkpoint
from tim_ray.config import Config, ConfigError, Derived, from_dict
from tim_ray.train.ema import ShardLocalEMA
from tim_ray.train.faults import Faults
from tim_ray.train.feed import Position, TrainingFeed
from tim_ray.train.init_from import load_init
from tim_ray.train.metrics import RunLog
from tim_ray.train.parallelize import apply_activation_checkpointing, autocast_dtype, shard_model
from tim_ray.train.ray_checkpoints import report_with_checkpoint
from tim_ray.train.step import RepaTargets, build_optimizer, step_generator, train_step
from tim_ray.train.stop import StopChecks, tell_driver
from tim_ray.transition.paths import get_path


def _device(cfg: Config) -> torch.device:
    if cfg.ray.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _use_all_local_cores(local_world_size: int) -> None:
    # Ray pins OMP threads to the worker's logical CPUs (1); on a small CPU box that leaves cores idle.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def build_worker_model(cfg: Config, in_channels: int, text_dim: int | None, device: torch.device, world: int,
                       init_weights: dict[str, torch.Tensor] | None = None):
    """Identical init on every rank (same seed, or the --init-from weights), then FSDP2 sharding; optimizer and
    EMA (a copy of the weights) over the shards."""
    from tim_ray.models.registry import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, in_channels, text_dim, device=device)
    if init_weights is not None:
        load_init(model, init_weights)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    model = shard_model(model, device, world)
    if cfg.train.compile:
        model = torch.compile(model)
    lr = Derived.of(cfg, world_size=world).lr
    optimizer = build_optimizer(model, cfg, lr)
    ema = ShardLocalEMA(model, cfg.ema.decay) if cfg.ema.enabled else None
    return model, optimizer, ema


def _resume(loop_config: dict, model, optimizer, ema, world: int) -> TrainState:
    """Load where this worker group starts: checkpoints_on_disk.resume_point (the newest verified checkpoint on
    disk, registered by Ray or not; --resume PATH until this launch has written a checkpoint of its own). Rank 0
    chooses and verifies, and every rank loads its choice. The returned state carries this launch's id, so the
    checkpoints it writes can be told from older ones after a restart."""
    import ray.train

    from tim_ray.artifacts.checkpoint import read_state
    from tim_ray.artifacts.checkpoints_on_disk import resume_point
    from tim_ray.train.ray_checkpoints import from_rank_zero, launch_id, local_run_storage

    launch, start_from = launch_id(), loop_config.get("start_from")
    registered = ray.train.get_checkpoint()
    run_storage = local_run_storage()
    if run_storage is None:  # remote storage: Ray's registered checkpoint, downloaded and verified on every rank
        state = TrainState(world_size=world)
        if registered is not None:
            with registered.as_directory() as directory:
                if not start_from or (launch is not None and read_state(directory)[0].launch == launch):
                    state = load_checkpoint(directory, model, optimizer, ema)
                    start_from = None
        if start_from:
            state = load_checkpoint(start_from, model, optimizer, ema)
    else:
        choice = error = None
        if ray.train.get_context().get_world_rank() == 0:
            def say(line: str) -> None:
                tell_driver(loop_config.get("control"), line, loop_config["config"]["train"]["name"])

            try:
                choice = resume_point(run_storage, start_from, launch, registered is not None, note=say)
            except (CheckpointError, OSError) as exc:
                error = str(exc)
            if choice:
                say(f"resuming from {choice}")
        choice, error = from_rank_zero((choice, error), next(model.parameters()).device)
        if error:
            raise CheckpointError(error)
        state = TrainState(world_size=world)
        if choice:
            state = load_checkpoint(choice, model, optimizer, ema, verify=False)
    state.launch = launch
    return state


class SampleLog:
    """Every step's sample ids, one JSON line per (step, rank) in <run dir>/samples_consumed/rank<r>.jsonl; with
    `attempt` (the step this worker group started at) a reader can tell redone steps from the ones that count."""

    def __init__(self, run_dir: Path, rank: int, world: int, attempt: int):
        directory = run_dir / "samples_consumed"
        directory.mkdir(parents=True, exist_ok=True)
        self.file = open(directory / f"rank{rank}.jsonl", "a")
        self.rank, self.world, self.attempt = rank, world, attempt

    def write(self, step: int, epoch: int, sample_ids: torch.Tensor) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "rank": self.rank, "world": self.world,
                                    "attempt": self.attempt, "ids": sample_ids.tolist()}) + "\n")
        self.file.flush()


def train_loop_per_worker(loop_config: dict) -> dict:
    """Train to cfg.train.steps. Returns (rank 0's is the run's result) {"status": finished | stopped | nonfinite
    | bad_checkpoint | bad_config, "step", "message"}: the ends that a retry cannot fix return instead of raising,
    so Ray does not restart the group for them."""
    import ray
    import ray.train

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    if device.type == "cpu":
        _use_all_local_cores(ctx.get_local_world_size())
    run_dir = Path(loop_config["run_dir"])
    faults = Faults.parse(loop_config.get("faults", ""))
    path = get_path(cfg.transition.path)
    try:
        # The codec and text encoder load here first: one that cannot (missing, refused weights) fails every retry.
        feed = TrainingFeed(cfg, ray.get(loop_config["data"]), rank, world, device)
    except ConfigError as exc:
        return {"status": "bad_config", "step": 0, "message": str(exc)}
    init = loop_config.get("init")
    model, optimizer, ema = build_worker_model(cfg, feed.channels, feed.text_dim, device, world,
                                               ray.get(init) if init is not None else None)
    try:
        state = _resume(loop_config, model, optimizer, ema, world)
    except CheckpointError as exc:
        return {"status": "bad_checkpoint", "step": 0, "message": str(exc)}
    control = loop_config.get("control")
    log = RunLog(cfg, run_dir, rank, world, tracker_ids=loop_config["mlflow"], control=control)
    log.start(state, model)
    if state.step >= cfg.train.steps and cfg.eval.objective:
        # Nothing left to train, but the run that wrote the last checkpoint may have died before reporting its
        # final evaluation (a Tune trial cut right after it): report it again from these weights, deterministically.
        from tim_ray.train.eval_objective import objective_scores

        ray.train.report({"step": state.step, **objective_scores(cfg, model, ema, feed, path)})
    samples_log = SampleLog(run_dir, rank, world, state.step) if cfg.train.sample_log else None
    feed.track_rejects(run_dir, state)
    stops = StopChecks(cfg.checkpoint.stop_check_every, control, rank, device, cfg.train.name)
    global_batch = None if cfg.data.aspect_buckets else Derived.of(cfg, world_size=world).global_batch
    batches = feed.batches(Position(state.epoch, state.epoch_samples), global_batch,
                           on_epoch_end=lambda epoch, counts: log.epoch_rejects(epoch, counts, state.step))
    null_text = feed.null_text() if cfg.transition.guidance_w_cond and feed.text else None
    repa = RepaTargets(cfg, feed.decode, device) if RepaTargets.wanted(cfg) else None
    nonfinite_in_a_row = 0
    while state.step < cfg.train.steps:
        faults.before_step(state.step, rank, run_dir)
        waited = time.perf_counter()
        batch, samples, position = next(batches)
        started = time.perf_counter()
        if samples_log:
            samples_log.write(state.step, state.epoch, batch["sample_id"])
        result = train_step(model, optimizer, faults.batch(batch, state.step), cfg, path,
                            step_generator(cfg.train.seed, state.step, rank),
                            autocast_dtype=autocast_dtype(cfg.train.precision, device), filler=feed.filler,
                            ema=ema, null_text=null_text, repa=repa)
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if result.skipped else 0
        if nonfinite_in_a_row > cfg.train.max_nonfinite_steps:
            log.finish(state, feed.report(run_dir), outcome="stopped on non-finite steps")
            return {"status": "nonfinite", "step": state.step,
                    "message": f"{nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (the "
                               f"last at step {state.step}); stopped with the last good checkpoint kept. Lower "
                               f"optim.lr or check the data, then resume"}
        if not result.skipped and ema is not None:
            ema.update(model)
        state.step, state.samples_seen = state.step + 1, state.samples_seen + samples
        state.epoch, state.epoch_samples = position.epoch, position.epoch_samples
        log.step(state, result, data_wait=started - waited, compute=time.perf_counter() - started)
        saved = _periodic(cfg, state, model, optimizer, ema, log, feed, path, loop_config)
        save_now, stop_reason = stops.check(state.step)
        if save_now and not saved:
            _checkpoint(state, model, optimizer, ema, log, feed, loop_config, rank)
        if stop_reason:
            log.finish(state, feed.report(run_dir), outcome=f"stopped ({stop_reason})")
            return {"status": "stopped", "step": state.step, "message": stop_reason}
    log.finish(state, feed.report(run_dir))
    return {"status": "finished", "step": state.step, "message": ""}


def _checkpoint(state: TrainState, model, optimizer, ema, log, feed, loop_config: dict, rank: int) -> None:
    state.mlflow_run_id = loop_config["mlflow"][1]
    state.epoch_rejects = feed.rejects.checkpoint(state.step)
    report_with_checkpoint(log.latest_metrics(), model, optimizer, ema, state, loop_config["config"], rank)


def _periodic(cfg: Config, state: TrainState, model, optimizer, ema, log, feed, path, loop_config) -> bool:
    """Sample grids (and the eval.objective scores, if set) every eval_every steps and checkpoints every
    checkpoint.every steps, and both at the end. Returns whether it saved a checkpoint."""
    import ray.train

    last = state.step == cfg.train.steps
    objective = {}
    if state.step % cfg.train.eval_every == 0 or last:
        log.sample_grid(state, model, ema, feed, path)
        if cfg.eval.objective:
            from tim_ray.train.eval_objective import objective_scores

            objective = objective_scores(cfg, model, ema, feed, path)
            log.tracker.log_metrics(objective, step=state.step)
    saved = state.step % cfg.checkpoint.every == 0 or last
    if saved:
        _checkpoint(state, model, optimizer, ema, log, feed, loop_config, ray.train.get_context().get_world_rank())
    if objective:
        # A report of its own, after this step's checkpoint: a Tune sweep counts exactly the reports that carry the
        # objective (tim_ray.tune.trial), whatever the checkpoint interval.
        ray.train.report({"step": state.step, **objective})
    return saved
