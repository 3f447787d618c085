"""`tim-ray train --dry-run`: what a run would do, computed without training, starting Ray or writing anything."""
from __future__ import annotations

from tim_ray.config import Config, Derived
from tim_ray.train.launch import check_local_fit, latest_checkpoint, ray_target, run_dir_of, storage_root

FP32 = 4


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3f} GiB"


def model_inputs(cfg: Config) -> tuple[int, int | None]:
    """(in_channels, text_dim) of the network from the data and the encoders' configs (no weights loaded)."""
    from tim_ray.data.batches import image_channels
    from tim_ray.models.text import text_feature_dim

    text_dim = text_feature_dim(cfg.model.text_encoder) if cfg.model.conditioning == "text" else None
    return image_channels(cfg), text_dim


def describe_plan(cfg: Config, start_from: str | None, address: str | None) -> str:
    """The plan; the data source is opened (listed and counted from metadata), so a missing path or a missing
    column is the same one-line error as in a real run."""
    from tim_ray.data.batches import open_training_data
    from tim_ray.models.registry import build_model, count_parameters

    check_local_fit(cfg, address)
    data = open_training_data(cfg)

    in_channels, text_dim = model_inputs(cfg)
    n_params = count_parameters(build_model(cfg.model, in_channels, text_dim, device="meta"))
    world = cfg.ray.num_workers
    derived = Derived.of(cfg)
    shard = n_params * FP32 / world
    ema = shard if cfg.ema.enabled else 0
    per_rank = {"params": shard, "grads": shard, "optimizer (AdamW m, v)": 2 * shard, "EMA": ema}
    workers = f"({cfg.ray.min_workers}, {world}) elastic" if cfg.ray.min_workers else str(world)
    target = ray_target(cfg, address) or f"a new local Ray ({cfg.ray.local_num_cpus} logical CPUs)"
    resume = start_from or latest_checkpoint(cfg) or "nothing (fresh start)"
    lines = [
        f"model:         {cfg.model.arch} ({cfg.model.conditioning}-conditioned), {n_params:,} parameters, "
        f"input {in_channels} channels" + (f", text features {text_dim}" if text_dim else ""),
        "memory/rank:   " + ", ".join(f"{k} {_gib(v)}" for k, v in per_rank.items())
        + f"; total {_gib(sum(per_rank.values()))} + activations",
        f"batch:         {cfg.train.batch_size} per worker x {world} workers x {cfg.train.grad_accum} accumulation"
        f" = global {derived.global_batch}",
        f"lr:            {derived.lr:g}" + (f" (= {cfg.optim.lr:g} x {derived.global_batch}/{cfg.optim.base_batch})"
                                            if cfg.optim.scale_lr else ""),
        f"scaling:       ScalingConfig(num_workers={workers}, use_gpu={cfg.ray.use_gpu}, "
        f"cpus_per_worker={cfg.ray.cpus_per_worker}) on {target}",
        f"data:          {cfg.data.source} {cfg.data.path or '(default location)'}, split {cfg.data.split}, "
        f"{cfg.data.height}x{cfg.data.width}" + (f", precomputed {cfg.data.precomputed}" if cfg.data.precomputed
                                                 else "") + f": {data.describe()}",
        f"steps:         {cfg.train.steps}, checkpoint every {cfg.checkpoint.every}, samples every "
        f"{cfg.train.eval_every} at NFE {cfg.eval.nfe}",
        f"run directory: {run_dir_of(cfg)}; checkpoints under {storage_root(cfg)}/{cfg.train.name}",
        f"resume:        {resume}",
    ]
    return "\n".join(lines)
