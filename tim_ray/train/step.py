"""One optimizer step of any transition.objective, free of Ray: the worker loop, the overfit test and benchmarks
call it.

Every random draw of a step (noise, (t, r), label dropout) comes from the generator it is given, which the loop
derives from (seed, step, rank) with `step_generator`; the step itself holds no RNG state, and a checkpoint needs
none: a resumed run draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tim_ray.config import Config, ConfigError
from tim_ray.train.ema import EMAModel, ShardLocalEMA
from tim_ray.transition.objective import ModelGuidance
from tim_ray.transition.objectives import get_objective
from tim_ray.transition.paths import TransitionPath


@dataclass
class StepResult:
    skipped: bool  # True when the loss or the gradient was not finite and no update was made
    grad_norm: float
    metrics: dict[str, float]  # the loss parts, averaged over micro-batches


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for all random draws of (step, rank): noise, (t, r), label dropout. A pure function of its
    arguments, which is what makes resume exact without saving RNG states."""
    # Wrapped to the 64 bits a generator takes: train.seed goes up to 2^32, where the product would overflow
    # (every seed below 2^28 gives the generator it always did).
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 65_537 + rank) % 2**64)


def conditioning(batch: dict, cfg: Config, generator: torch.Generator) -> dict:
    """The model's condition kwargs for a batch. Text: the caption features (caption dropout to "" already
    happened in the data pipeline). Class: the label, replaced by the null class with prob data.caption_dropout."""
    if cfg.model.conditioning == "text":
        return {"context": batch["text"], "context_mask": batch["text_mask"]}
    labels = batch["label"]
    drop = torch.rand(labels.shape, generator=generator, device=generator.device) < cfg.data.caption_dropout
    return {"y": torch.where(drop.to(labels.device), torch.full_like(labels, cfg.model.num_classes), labels)}


def model_guidance(chunk: dict, cfg: Config, model: nn.Module, ema: ShardLocalEMA | None,
                   null_text: dict | None) -> ModelGuidance | None:
    """What the enhanced target needs (docs/math.md §6), None when it is off: the EMA network and its two
    conditions, the true one (the label before dropout; a text batch's captions, whose dropout happened upstream)
    and the null one (the null class, or the empty caption's features `null_text`, (1, L, D) and (1, L))."""
    if cfg.transition.guidance_w_cond == 0:
        return None
    if ema is None:
        raise ValueError("transition.guidance_w_cond ≠ 0 needs the EMA network (ema.enabled)")
    if cfg.model.conditioning == "text":
        rows = len(chunk["text"])
        cond = {"context": chunk["text"], "context_mask": chunk["text_mask"]}
        uncond = {key: value.expand(rows, *value.shape[1:]) for key, value in null_text.items()}
    else:
        labels = chunk["label"]
        cond, uncond = {"y": labels}, {"y": torch.full_like(labels, cfg.model.num_classes)}
    return ModelGuidance(model=EMAModel(ema, model), cond=cond, uncond=uncond)


class RepaTargets:
    """REPA's target features of a micro-batch (docs/math.md §8): its images decoded by the codec, through the
    frozen vision encoder at the network's token grid (latent size / patch size)."""

    def __init__(self, cfg: Config, decode, device: torch.device | str):
        from tim_ray.models.registry import get_arch
        from tim_ray.models.vision import load_vision_encoder

        self.encoder = load_vision_encoder(cfg.transition.repa_encoder, device)
        if self.encoder.dim != cfg.model.repa_dim:
            raise ConfigError(f"model.repa_dim = {cfg.model.repa_dim} must be the width of transition.repa_encoder "
                              f"= {cfg.transition.repa_encoder!r}, {self.encoder.dim}")
        self.decode, self.patch = decode, get_arch(cfg.model.arch).patch_size

    def __call__(self, x: Tensor) -> Tensor:
        return self.encoder.features(self.decode(x), (x.shape[-2] // self.patch, x.shape[-1] // self.patch))

    @staticmethod
    def wanted(cfg: Config) -> bool:
        """REPA is on: a projector (model.repa_dim > 0) and a positive coefficient."""
        return cfg.model.repa_dim > 0 and cfg.transition.repa_coeff > 0


def micro_batches(batch: dict, count: int, filler: dict | None = None) -> list[tuple[dict, float]]:
    """`count` (micro-batch, its share of the batch's rows) pairs for gradient accumulation: the rows split along
    dim 0 into parts whose sizes differ by at most one. Rejected rows can leave a rank fewer rows than micro-steps,
    or none; an empty part is `filler` (a 1-row batch, default the batch's first row) with share 0, so that every
    rank still runs every forward and backward that the sharded model's collectives expect."""
    size = len(batch["image"])
    if size == 0 and filler is None:
        raise ValueError("an empty batch needs a filler row")
    parts = []
    for i in range(count):
        part = {k: v.tensor_split(count)[i] for k, v in batch.items()}
        rows = len(part["image"])
        if rows:
            parts.append((part, rows / size))
        else:
            parts.append((filler if filler is not None else {k: v[:1] for k, v in batch.items()}, 0.0))
    return parts


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, cfg: Config, path: TransitionPath,
               generator: torch.Generator, autocast_dtype: torch.dtype = torch.float32,
               filler: dict | None = None, ema: ShardLocalEMA | None = None, null_text: dict | None = None,
               repa: RepaTargets | None = None) -> StepResult:
    """Forward + backward over `train.grad_accum` micro-batches, clip, and step unless anything is non-finite.
    The loss is the configured objective's (transition.objective), the mean over the batch's rows (micro-batch
    means weighted by their rows); a rank with no rows (all rejected) runs `filler` with weight 0. `ema` (and, for
    text, `null_text`) feed the enhanced target when guidance is on; `repa` gives REPA's target features."""
    objective = get_objective(cfg.transition.objective)
    optimizer.zero_grad(set_to_none=True)
    parts: dict[str, list[float]] = {}
    for chunk, share in micro_batches(batch, cfg.train.grad_accum, filler):
        x = chunk["image"]
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        times = objective.draw_times(len(x), path, cfg.transition, generator, device=x.device)
        cond = conditioning(chunk, cfg, generator)
        guidance = model_guidance(chunk, cfg, model, ema, null_text)
        repa_target = repa(x) if repa is not None else None
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = objective.loss(model, x, z, times, cond, path=path, config=cfg.transition, guidance=guidance,
                                 repa_target=repa_target)
        # Backward even through a non-finite loss: under FSDP every rank must join the gradient reduction, and the
        # NaN it spreads makes the global gradient norm non-finite on every rank, so all ranks skip together.
        (out.loss * share).backward()
        if share:
            for name, value in out.metrics().items():
                parts.setdefault(name, []).append(value)
    grad_norm = _full(nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
    # A row type absent from a micro-batch has a NaN mean; average over the micro-batches that had it.
    metrics = {name: _nanmean(values) for name, values in parts.items()}
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(skipped=True, grad_norm=grad_norm, metrics=metrics)
    optimizer.step()
    return StepResult(skipped=False, grad_norm=grad_norm, metrics=metrics)


def _nanmean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def _full(norm: torch.Tensor) -> float:
    """The global norm as a float; under FSDP2 clip_grad_norm_ returns a DTensor."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """AdamW over all parameters, nothing excluded from decay (docs/math.md §9)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
