"""The Ray Train worker: build, shard, (resume,) train, log, sample, checkpoint. One function per phase."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tim_ray.config import Config, Derived, from_dict
from tim_ray.train.checkpoint import TrainState, load_checkpoint, report_with_checkpoint, step_generator
from tim_ray.train.ema import ShardLocalEMA
from tim_ray.train.feed import Position, TrainingFeed
from tim_ray.train.metrics import RunLog
from tim_ray.train.parallelize import apply_activation_checkpointing, autocast_dtype, shard_model
from tim_ray.train.step import build_optimizer, train_step
from tim_ray.transition.paths import get_path


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _device(cfg: Config) -> torch.device:
    if cfg.ray.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _use_all_local_cores(local_world_size: int) -> None:
    # Ray pins OMP threads to the worker's logical CPUs (1); on a small CPU box that leaves cores idle.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def build_worker_model(cfg: Config, in_channels: int, text_dim: int | None, device: torch.device, world: int):
    """Identical init on every rank (same seed), then FSDP2 sharding; optimizer and EMA over the shards."""
    from tim_ray.models.registry import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, in_channels, text_dim, device=device)
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
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory, model, optimizer, ema)
    if loop_config.get("start_from"):
        return load_checkpoint(loop_config["start_from"], model, optimizer, ema)
    return TrainState(world_size=world)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train

    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(cfg)
    if device.type == "cpu":
        _use_all_local_cores(ctx.get_local_world_size())
    path = get_path(cfg.transition.path)
    feed = TrainingFeed(cfg, ray.get(loop_config["data"]), rank, world, device)
    model, optimizer, ema = build_worker_model(cfg, feed.channels, feed.text_dim, device, world)
    state = _resume(loop_config, model, optimizer, ema, world)
    log = RunLog(cfg, Path(loop_config["run_dir"]), rank, world, tracker_ids=loop_config["mlflow"])
    log.start(state, model)
    global_batch = None if cfg.data.aspect_buckets else Derived.of(cfg, world_size=world).global_batch
    batches = feed.batches(Position(state.epoch, state.epoch_samples), global_batch)
    nonfinite_in_a_row = 0
    while state.step < cfg.train.steps:
        waited = time.perf_counter()
        batch, samples, position = next(batches)
        started = time.perf_counter()
        result = train_step(model, optimizer, batch, cfg, path, step_generator(cfg.train.seed, state.step, rank),
                            autocast_dtype=autocast_dtype(cfg.train.precision, device))
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if result.skipped else 0
        if nonfinite_in_a_row > cfg.train.max_nonfinite_steps:
            raise NonFiniteTraining(f"{nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient "
                                    f"(last at step {state.step}); the last good checkpoint is kept")
        if not result.skipped and ema is not None:
            ema.update(model)
        state.step, state.samples_seen = state.step + 1, state.samples_seen + samples
        state.epoch, state.epoch_samples = position.epoch, position.epoch_samples
        log.step(state, result, data_wait=started - waited, compute=time.perf_counter() - started)
        _periodic(cfg, state, model, optimizer, ema, log, feed, path, loop_config)
    log.finish(state, feed.report())


def _periodic(cfg: Config, state: TrainState, model, optimizer, ema, log, feed, path, loop_config) -> None:
    """Sample grids every eval_every steps and checkpoints every checkpoint.every steps, and both at the end."""
    last = state.step == cfg.train.steps
    if state.step % cfg.train.eval_every == 0 or last:
        log.sample_grid(state, model, ema, feed, path)
    if state.step % cfg.checkpoint.every == 0 or last:
        import ray.train

        state.mlflow_run_id = loop_config["mlflow"][1]
        report_with_checkpoint(log.latest_metrics(), model, optimizer, ema, state, loop_config["config"],
                               ray.train.get_context().get_world_rank())
