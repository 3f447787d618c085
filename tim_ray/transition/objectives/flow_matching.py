"""Flow matching (docs/math.md §5.2): every row has r = t, and the network learns the instantaneous velocity.

    F_tgt = ṽ                                      (v = dx_t/dt, or the enhanced velocity with model guidance)
    L_i   = mean(F_pred - F_tgt)² [+ mean(1 - cos_c(F_pred, F_tgt))]
    loss  = mean_i(a_i·L_i) + repa_coeff·L_repa
This is TiM's loss restricted to r = t (oracle O3: no derivative forward, time weight 1), so it runs through the
same code; t comes from the configured interval family (its `t`; the `independent` family's t is one
logit-normal draw). It reproduces, draw for draw, the former emulation `transition.diffusion_ratio = 1,
consistency_ratio = 0`. Sampling: Euler on the instantaneous velocity (r = t), the only r it was trained on.
"""
from __future__ import annotations

import dataclasses

from tim_ray.config import TransitionConfig
from tim_ray.transition.objective import transition_loss
from tim_ray.transition.objectives.base import BACKWARD, COMMON_KEYS, FORWARD, Objective, guidance_forwards


class FlowMatching(Objective):
    name = "flow_matching"
    uses = COMMON_KEYS | {"directional_loss"}
    sample_modes = ("diffusion",)

    def draw_times(self, batch, path, config, generator, device=None):
        """The family's t with r := t on every row (its r is drawn and discarded, as the emulation did)."""
        every_row = dataclasses.replace(config, diffusion_ratio=1.0, consistency_ratio=0.0)
        return super().draw_times(batch, path, every_row, generator, device)

    def loss(self, model, x, z, times, cond, *, path, config, guidance=None, repa_target=None):
        if not bool((times.r == times.t).all()):
            raise ValueError("flow matching trains on r = t only; draw the times with FlowMatching.draw_times")
        return transition_loss(model, x, z, times.t, times.r, cond, path=path, config=config,
                               repa_target=repa_target, guidance=guidance)

    def forwards_per_row(self, config: TransitionConfig) -> float:
        """3: one gradient pass, plus the enhanced target's EMA forwards."""
        return FORWARD + BACKWARD + guidance_forwards(config)
