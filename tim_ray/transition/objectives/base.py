"""What every training objective provides to the step, the sampler and the config (docs/math.md §5).

An objective owns four things: the (t, r) pairs it trains on, the loss of one micro-batch, the rule by which a
sampler picks r for a step t -> t_next, and its compute accounting. The training step calls `draw_times` and
`loss` and knows nothing else about which objective runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from tim_ray.config import TransitionConfig
from tim_ray.transition.intervals import Intervals, sample_intervals
from tim_ray.transition.objective import ModelGuidance, TransitionLoss
from tim_ray.transition.paths import TransitionPath

Model = Callable[..., Tensor]

# Forward-equivalents of one network pass over a row (docs/math.md §7): a forward costs 1 and its backward about
# 2, so a gradient step on a row costs 3.
FORWARD, BACKWARD = 1.0, 2.0
# A torch.func.jvp pass: the primal forward plus a tangent pass of about the same arithmetic.
JVP = 2 * FORWARD

# transition.* keys every objective reads: the path, the law of t, the loss's adaptive weight and the two extras
# (model guidance and REPA) that any velocity-like target can take.
COMMON_KEYS = frozenset({
    "objective", "path", "interval_sampler", "p_mean", "p_std", "delta_logit_mean", "delta_logit_std",
    "adaptive_weight", "repa_coeff", "repa_encoder", "guidance_w_gt", "guidance_w_cond", "guidance_window",
})


def guidance_forwards(config: TransitionConfig) -> float:
    """EMA forwards per row for the enhanced target: 0 when off (w_cond = 0), else the conditional branch, plus
    the null branch unless its coefficient 1 - w_gt - w_cond is 0. Both run on every row, in or out of the window."""
    if config.guidance_w_cond == 0:
        return 0.0
    return FORWARD * (1 if 1.0 - config.guidance_w_gt - config.guidance_w_cond == 0 else 2)


class Objective(ABC):
    name: str
    uses: frozenset[str]  # the transition.* keys it reads; the config refuses others set away from their default
    sample_modes: tuple[str, ...]  # the sampler rules (transition.sampler MODES) its network can be sampled with

    def draw_times(self, batch: int, path: TransitionPath, config: TransitionConfig, generator: torch.Generator,
                   device: torch.device | str | None = None) -> Intervals:
        """The (t, r) pairs of one micro-batch: the configured family with its diffusion and consistency rows."""
        return sample_intervals(batch, path, config, generator, device=device)

    @abstractmethod
    def loss(self, model: Model, x: Tensor, z: Tensor, times: Intervals, cond: dict, *, path: TransitionPath,
             config: TransitionConfig, guidance: ModelGuidance | None = None,
             repa_target: Tensor | None = None) -> TransitionLoss:
        """The differentiable loss of one micro-batch and its logged parts."""

    @abstractmethod
    def forwards_per_row(self, config: TransitionConfig) -> float:
        """Network forward-equivalents per training row of one step (forward 1, backward 2), EMA forwards of the
        enhanced target included; REPA's frozen encoder is another network and is not counted."""

    def check(self, config: TransitionConfig) -> str | None:
        """Why this objective cannot run `config` beyond the unused keys (one line), or None."""
        return None
