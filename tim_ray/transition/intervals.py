"""(t, r) samplers (docs/math.md §4), behind a registry keyed by `transition.interval_sampler`.

Every sampler returns pairs with T_min ≤ r ≤ t ≤ T_max. Then `assign_row_types` turns rows into three kinds:
    diffusion   r = t       the first round(diffusion_ratio·B) rows      (plain flow matching)
    consistency r = T_min   the last round(consistency_ratio·B) rows     (wins where the two overlap)
    transition  the rest, with the sampled r.
`round` is Python's (half to even), as in the official code. The families differ only in the (t, r) law:
    logit_normal_pair  τ1, τ2 i.i.d. with σ_i = exp(P_mean + P_std·n_i), τ_i = time_from_sigma(σ_i); t = max, r = min
    uniform_pair       τ1, τ2 i.i.d. uniform on [T_min, T_max]; t = max, r = min
    independent        t as one logit-normal τ; r = t - f·(t - T_min) with f = sigmoid(μ_Δ + s_Δ·m), m ~ N(0, 1)
Draws use the given torch.Generator only, in float64 on the generator's device, so a seed fixes the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tim_ray.config import TransitionConfig
from tim_ray.transition.paths import TransitionPath


@dataclass(frozen=True)
class Intervals:
    """A batch of (t, r) pairs, shape (B,) each, with boolean row-type masks (exactly one is true per row)."""

    t: Tensor
    r: Tensor
    diffusion: Tensor
    consistency: Tensor

    @property
    def transition(self) -> Tensor:
        return ~(self.diffusion | self.consistency)


def row_types(t: Tensor, r: Tensor, t_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """(diffusion, consistency, transition) masks read off the values: r = t, else r = T_min, else the rest."""
    diffusion = r == t
    consistency = (r == t_min) & ~diffusion
    return diffusion, consistency, ~(diffusion | consistency)


def _logit_normal_time(n: int, path: TransitionPath, p_mean: float, p_std: float,
                       generator: torch.Generator) -> Tensor:
    """τ = time_from_sigma(exp(P_mean + P_std·n)), n ~ N(0, 1)."""
    normal = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
    return path.time_from_sigma(torch.exp(p_mean + p_std * normal))


def logit_normal_pair(n: int, path: TransitionPath, config: TransitionConfig,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The paper's law: two i.i.d. logit-normal times, t = max, r = min. P(t ≤ a) = Φ((log σ(a) - P_mean)/P_std)²."""
    tau1 = _logit_normal_time(n, path, config.p_mean, config.p_std, generator)
    tau2 = _logit_normal_time(n, path, config.p_mean, config.p_std, generator)
    return torch.maximum(tau1, tau2), torch.minimum(tau1, tau2)


def uniform_pair(n: int, path: TransitionPath, config: TransitionConfig,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two i.i.d. uniform times on [T_min, T_max], t = max, r = min: P(t ≤ a) = ((a - T_min)/(T_max - T_min))²."""
    width = path.t_max - path.t_min
    tau = path.t_min + width * torch.rand(2, n, generator=generator, device=generator.device, dtype=torch.float64)
    return tau.max(dim=0).values, tau.min(dim=0).values


def independent(n: int, path: TransitionPath, config: TransitionConfig,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """t logit-normal (P_mean, P_std); the interval is an independent fraction of the way down to T_min:
    r = t - f·(t - T_min), f = sigmoid(delta_logit_mean + delta_logit_std·m). Sweeps the law of t and of Δt apart."""
    t = _logit_normal_time(n, path, config.p_mean, config.p_std, generator)
    normal = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
    fraction = torch.sigmoid(config.delta_logit_mean + config.delta_logit_std * normal)
    return t, t - fraction * (t - path.t_min)


IntervalFamily = Callable[[int, TransitionPath, TransitionConfig, torch.Generator], tuple[Tensor, Tensor]]
INTERVAL_SAMPLERS: dict[str, IntervalFamily] = {
    "logit_normal_pair": logit_normal_pair,
    "uniform_pair": uniform_pair,
    "independent": independent,
}


def get_interval_sampler(name: str) -> IntervalFamily:
    """The (t, r) family registered under `name` (the config key `transition.interval_sampler`)."""
    if name not in INTERVAL_SAMPLERS:
        raise ValueError(f"unknown interval sampler {name!r}; choose one of {', '.join(INTERVAL_SAMPLERS)}")
    return INTERVAL_SAMPLERS[name]


def assign_row_types(t: Tensor, r: Tensor, t_min: float, diffusion_ratio: float,
                     consistency_ratio: float) -> Intervals:
    """Set r := t on the first round(diffusion_ratio·B) rows, then r := T_min on the last round(consistency_ratio·B)."""
    batch = t.shape[0]
    n_diffusion, n_consistency = round(diffusion_ratio * batch), round(consistency_ratio * batch)
    diffusion = torch.zeros(batch, dtype=torch.bool, device=t.device)
    consistency = torch.zeros_like(diffusion)
    diffusion[:n_diffusion] = True
    consistency[batch - n_consistency:] = True
    diffusion &= ~consistency
    r = torch.where(diffusion, t, r)
    r = torch.where(consistency, torch.full_like(r, t_min), r)
    return Intervals(t=t, r=r, diffusion=diffusion, consistency=consistency)


def sample_intervals(batch_size: int, path: TransitionPath, config: TransitionConfig, generator: torch.Generator,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Intervals:
    """Draw (t, r) from the configured family, cast to `dtype` on `device`, and assign the row types."""
    t, r = get_interval_sampler(config.interval_sampler)(batch_size, path, config, generator)
    # Casting after t = max, r = min keeps r ≤ t: rounding to a coarser dtype is monotone.
    t, r = t.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)
    return assign_row_types(t, r, path.t_min, config.diffusion_ratio, config.consistency_ratio)
