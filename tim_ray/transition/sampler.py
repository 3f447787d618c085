"""Any-step sampling of a transition model (docs/math.md §10).

    grid = linspace(T_max, T_min, N + 1);  x_{T_max} = noise
    for each step (t, t_next):
        r = t_next ('transition' mode)  |  r = t ('diffusion' mode: Euler on the instantaneous velocity)
        F = F_u + w·(F_c - F_u)  when CFG is active at t, else F_c
        x = transition(x, F, t, t_next), or the stochastic transition when s > 0, t < T_max and t_next > T_min
CFG is active when w ≠ 1 and lo·T_max < t < hi·T_max, and then an uncond is required. `guide_first_step=True`
(our default) closes the upper end (t ≤ hi·T_max), so a 1-step sample is guided. False is the official strict
interval, which never guides t = T_max (docs/math.md B3).

NFE counts network evaluations per sample: a batched cond+uncond forward counts 2 (the usual convention; one step
costs as much as two unguided ones). `forward_calls` counts calls of `model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tim_ray.config import SampleConfig
from tim_ray.transition.paths import TransitionPath

Model = Callable[..., Tensor]
MODES = ("transition", "diffusion")


@dataclass
class SampleOutput:
    """The final state x_{T_min} (in the state dtype), the NFE (batched cond+uncond = 2) and the model calls."""

    x: Tensor
    nfe: int
    forward_calls: int


def time_grid(path: TransitionPath, steps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """linspace(T_max, T_min, steps + 1)."""
    return torch.linspace(path.t_max, path.t_min, steps + 1, dtype=dtype)


def cfg_active(t: float, t_max: float, scale: float, interval: tuple[float, float], guide_first_step: bool) -> bool:
    """Guidance at time t: scale ≠ 1 and lo·T_max < t < hi·T_max, with the upper end closed if guide_first_step."""
    lo, hi = interval[0] * t_max, interval[1] * t_max
    below_upper = t <= hi if guide_first_step else t < hi
    return scale != 1.0 and lo < t and below_upper


def concat_conditions(cond: dict, uncond: dict) -> dict:
    """One condition dict for a batched cond+uncond forward: tensors concatenated along dim 0 (they must match in
    every other dim, e.g. captions padded to one length); other values must be equal in both."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    merged = {}
    for key, value in cond.items():
        if torch.is_tensor(value):
            merged[key] = torch.cat([value, uncond[key]])
        elif value == uncond[key]:
            merged[key] = value
        else:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] differ and are not tensors")
    return merged


def guided_prediction(model: Model, x: Tensor, t: Tensor, r: Tensor, cond: dict, uncond: dict | None,
                      scale: float, guided: bool) -> tuple[Tensor, int]:
    """(F, NFE): F_u + scale·(F_c - F_u) from one batched forward when `guided`, else F_c from one forward."""
    if not guided:
        return model(x, t, r, **cond), 1
    if uncond is None:
        raise ValueError("classifier-free guidance needs an uncond (the null condition)")
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), **concat_conditions(cond, uncond))
    F_cond, F_uncond = both.chunk(2)
    return F_uncond + scale * (F_cond - F_uncond), 2


@torch.no_grad()
def sample(model: Model, noise: Tensor, cond: dict | None = None, uncond: dict | None = None, *,
           path: TransitionPath, steps: int, mode: str = "transition", cfg_scale: float = 1.0,
           cfg_interval: tuple[float, float] = (0.0, 1.0), guide_first_step: bool = True, stochasticity: float = 0.0,
           generator: torch.Generator | None = None, state_dtype: torch.dtype = torch.float64,
           model_dtype: torch.dtype = torch.float32) -> SampleOutput:
    """Run `steps` transitions from `noise` (the state at T_max). The state is kept in `state_dtype`; the network
    sees x, t and r in `model_dtype` (use autocast, not model_dtype, for bf16 compute). `generator` drives the noise
    of stochastic steps only, so a fixed generator state gives a fixed sample."""
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    if stochasticity > 0 and not path.supports_stochastic:
        raise ValueError(f"the {path.name} path has no stochastic transition; use stochasticity 0")
    cond = cond or {}
    grid = time_grid(path, steps).tolist()
    x = noise.to(state_dtype)
    nfe = calls = 0
    for t, t_next in zip(grid[:-1], grid[1:]):
        r = t if mode == "diffusion" else t_next
        t_in = torch.full((len(x),), t, dtype=model_dtype, device=x.device)
        r_in = torch.full((len(x),), r, dtype=model_dtype, device=x.device)
        guided = cfg_active(t, path.t_max, cfg_scale, cfg_interval, guide_first_step)
        F, cost = guided_prediction(model, x.to(model_dtype), t_in, r_in, cond, uncond, cfg_scale, guided)
        nfe, calls = nfe + cost, calls + 1
        # No noise is injected on the first step (t = T_max) nor the last (t_next = T_min), as in docs/math.md §10.
        noisy = stochasticity > 0 and t < path.t_max and t_next > path.t_min
        x = _advance(path, x, F.to(state_dtype), t, t_next, stochasticity if noisy else 0.0, generator)
    return SampleOutput(x=x, nfe=nfe, forward_calls=calls)


def _advance(path: TransitionPath, x: Tensor, F: Tensor, t: float, t_next: float, stochasticity: float,
             generator: torch.Generator | None) -> Tensor:
    """One transition t -> t_next in the state dtype, stochastic when `stochasticity` > 0."""
    t_vec = torch.full((len(x),), t, dtype=x.dtype, device=x.device)
    next_vec = torch.full((len(x),), t_next, dtype=x.dtype, device=x.device)
    if stochasticity == 0:
        return path.transition(x, F, t_vec, next_vec)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return path.stochastic_transition(x, F, t_vec, next_vec, stochasticity, noise)


def sample_from_config(model: Model, noise: Tensor, cond: dict | None, uncond: dict | None, *,
                       path: TransitionPath, config: SampleConfig, steps: int | None = None,
                       generator: torch.Generator | None = None, model_dtype: torch.dtype = torch.float32
                       ) -> SampleOutput:
    """`sample` with the `[sample]` section's settings; `steps` overrides config.nfe (the step count)."""
    return sample(model, noise, cond, uncond, path=path, steps=steps or config.nfe, mode=config.mode,
                  cfg_scale=config.cfg_scale, cfg_interval=tuple(config.cfg_interval),
                  guide_first_step=config.guide_first_step, stochasticity=config.stochasticity,
                  generator=generator, model_dtype=model_dtype)
