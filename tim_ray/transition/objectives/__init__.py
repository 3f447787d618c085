"""The training objectives, one registry keyed by `transition.objective` (docs/math.md §5).

    tim            the transition objective: F_tgt = ṽ - (t - r)·dF/dt with time and adaptive weights
    flow_matching  r = t on every row: F_tgt = ṽ, Euler sampling
    meanflow       the average velocity u(x_t, t, r): u_tgt = ṽ - (t - r)·du/dt, plain adaptive MSE, JVP or DDE
"""
from __future__ import annotations

import dataclasses

from tim_ray.config import TransitionConfig
from tim_ray.transition.objectives.base import Objective
from tim_ray.transition.objectives.flow_matching import FlowMatching
from tim_ray.transition.objectives.meanflow import MeanFlow
from tim_ray.transition.objectives.tim import TiM

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (TiM(), FlowMatching(), MeanFlow())}


def get_objective(name: str) -> Objective:
    """The objective registered under `name` (the config key `transition.objective`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def unused_settings(config: TransitionConfig) -> list[str]:
    """The transition.* keys set away from their default that the configured objective does not read."""
    objective, default = get_objective(config.objective), TransitionConfig()
    return [f.name for f in dataclasses.fields(config)
            if f.name not in objective.uses and getattr(config, f.name) != getattr(default, f.name)]


__all__ = ["OBJECTIVES", "Objective", "get_objective", "unused_settings"]
