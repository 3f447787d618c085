"""TiM, the transition objective (arXiv 2509.04394; docs/math.md §5.1).

    F_tgt = ṽ - (t - r)·sg(dF/dt)           (OT-FM; TrigFlow: ṽ - tan(t - r)·(x_t + sg(dF/dt)))
    L_i   = mean(F_pred - F_tgt)² [+ mean(1 - cos_c(F_pred, F_tgt))]
    loss  = mean_i(w(t_i, r_i)·a_i·L_i) + repa_coeff·L_repa
with dF/dt the total derivative along the conditional path (DDE or JVP), w the time weight and a_i the adaptive
weight. Rows with r = t are flow-matching rows (F_tgt = ṽ, no derivative forward, w = 1).
Sampling: r = t_next (the transition map), or r = t (Euler on the instantaneous velocity).
"""
from __future__ import annotations

from tim_ray.config import TransitionConfig
from tim_ray.transition.objective import transition_loss
from tim_ray.transition.objectives.base import BACKWARD, FORWARD, JVP, Objective, guidance_forwards


class TiM(Objective):
    name = "tim"
    uses = frozenset(TransitionConfig.__dataclass_fields__)
    sample_modes = ("transition", "diffusion")

    def loss(self, model, x, z, times, cond, *, path, config, guidance=None, repa_target=None):
        return transition_loss(model, x, z, times.t, times.r, cond, path=path, config=config,
                               repa_target=repa_target, guidance=guidance)

    def forwards_per_row(self, config: TransitionConfig) -> float:
        """3 for the gradient pass, + 2 no-grad forwards on the rows with r ≠ t (those that are not diffusion
        rows; consistency rows override diffusion rows), + the enhanced target's EMA forwards."""
        moving = 1.0 - min(config.diffusion_ratio, 1.0 - config.consistency_ratio)
        derivative = 2 * FORWARD if config.derivative == "dde" else JVP
        return FORWARD + BACKWARD + derivative * moving + guidance_forwards(config)
