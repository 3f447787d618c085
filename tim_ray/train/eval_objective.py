"""The `eval.objective` score, computed inside training: multi-NFE sample quality of the EMA weights, which
`tim-ray tune` optimises.

With `eval.objective` set, every `train.eval_every` steps (and at the last step) the training loop draws
`eval.num_samples` images at each step count in `eval.nfe`, scores them with the named metric and reports
    objective        = the mean of the metric over eval.nfe      (what `tim-ray tune` optimises)
    objective_nfe<n> = the metric at n steps
The conditions and the starting noise are the same at every evaluation of every trial (`tim-ray eval`'s targets: fresh
`shapes` scenes from a seed no training run uses, or the Fashion-MNIST classes in turn; noise from sample.seed), so
two scores differ only by the weights that drew them.

All ranks sample together (FSDP2 needs every rank in each forward): rank r draws its own contiguous share of the
samples, rank 0 gathers and scores them, and every rank returns rank 0's scores.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist

from tim_ray.eval.conditions import label_conditions, prompt_conditions
from tim_ray.eval.evaluate import EvalTargets, eval_targets
from tim_ray.eval.generate import sample_images

OBJECTIVE = "objective"
# Tune's optimisation direction per metric (the metrics `eval.objective` accepts).
MODES = {"shapes": "max", "class_agreement": "max"}


def per_nfe_key(nfe: int) -> str:
    return f"{OBJECTIVE}_nfe{nfe}"


def rank_share(count: int, rank: int, world: int) -> list[int]:
    """The sample indices rank `rank` draws: a contiguous block of ceil(count / world). Every rank draws the same
    number, because each FSDP forward needs all ranks; the last ranks wrap around to index 0 and their extra
    images are dropped after the gather."""
    per_rank = math.ceil(count / world)
    return [(rank * per_rank + i) % count for i in range(per_rank)]


def _conditions(feed, targets: EvalTargets, indices: list[int], num_classes: int) -> tuple[dict, dict]:
    if targets.labels:
        return label_conditions([targets.labels[i] for i in indices], num_classes, feed.device)
    return prompt_conditions(feed.text, [targets.prompts[i] for i in indices])


def _gather(images: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """Every rank's share, in rank order, trimmed to `count` (on the CPU). The collective runs on `device`: NCCL
    only moves GPU tensors."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return images[:count]
    local = images.to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()[:count]


@torch.no_grad()
def objective_samples(cfg, model, ema, feed, path, targets: EvalTargets) -> dict[int, torch.Tensor]:
    """{nfe: (eval.num_samples, C, H, W) images in [-1, 1]} drawn for `targets` with the EMA weights (the trained
    ones without EMA); every rank must call this, and every rank gets the same images."""
    count = cfg.eval.num_samples
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = rank_share(count, rank, world)
    cond, uncond = _conditions(feed, targets, indices, cfg.model.num_classes)
    noise = torch.randn((count, *feed.sample_shape), generator=torch.Generator().manual_seed(cfg.sample.seed))
    with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():
        return {nfe: _gather(sample_images(model, cond, uncond, noise[indices], nfe, path, cfg.sample,
                                           cfg.sample.seed, decode=feed.decode), count, feed.device)
                for nfe in cfg.eval.nfe}


@functools.lru_cache(maxsize=1)
def _fashion_feature_net():
    """Loaded (or trained and cached, about half a minute) once per worker process, not at every evaluation."""
    from tim_ray.eval.fashion import load_feature_net

    return load_feature_net()


def score_samples(metric: str, images: torch.Tensor, targets: EvalTargets) -> float:
    """One number for (N, C, H, W) images in [-1, 1] drawn for `targets`; higher is better (see MODES)."""
    if metric == "shapes":
        from tim_ray.eval.grid import to_uint8
        from tim_ray.eval.shapes_score import shapes_scores

        pixels = to_uint8(images)
        return shapes_scores(pixels if pixels.shape[-1] == 3 else pixels.repeat(3, -1), targets.scenes)["shapes"]
    if metric == "class_agreement":
        from tim_ray.eval.fashion import class_agreement

        return class_agreement(_fashion_feature_net(), images, targets.classes)
    raise ValueError(f"no objective metric {metric!r}; choose from {', '.join(MODES)}")


def objective_scores(cfg, model, ema, feed, path) -> dict[str, float]:
    """{"objective": mean over eval.nfe, "objective_nfe<n>": score at n steps} of the current weights, on every
    rank (a collective: every rank must call it)."""
    targets = eval_targets(cfg, cfg.eval.num_samples)
    samples = objective_samples(cfg, model, ema, feed, path, targets)
    scores = [0.0] * len(cfg.eval.nfe)
    if not dist.is_initialized() or dist.get_rank() == 0:
        scores = [score_samples(cfg.eval.objective, samples[nfe], targets) for nfe in cfg.eval.nfe]
    if dist.is_initialized():
        shared = torch.tensor(scores, dtype=torch.float64, device=feed.device)
        dist.broadcast(shared, src=0)
        scores = shared.tolist()
    return {OBJECTIVE: sum(scores) / len(scores), **{per_nfe_key(n): s for n, s in zip(cfg.eval.nfe, scores)}}
