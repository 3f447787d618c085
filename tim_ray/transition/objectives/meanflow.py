"""MeanFlow (Geng et al., arXiv 2505.13447; docs/math.md §5.3): the network u(x_t, t, r) is the average velocity
over [r, t], u = (x_t - Φ_{t→r}(x_t))/(t - r), trained with the MeanFlow identity

    u_tgt = ṽ - (t - r)·sg(du/dt),     du/dt = ∂_x u·v + ∂_t u     (the total derivative along (v, 1, 0))
    L_i   = mean(u_pred - u_tgt)²
    loss  = mean_i(a_i·L_i) + repa_coeff·L_repa                   (a_i = 1/(sg(L_i) + 1e-5) when adaptive)

On the OT-FM path this is TiM's target (the identity is the same); the objectives differ in the loss (no time
weight, no directional term) and in how du/dt is taken:
    derivative = "jvp"  the paper's form: one torch.func.jvp gives u_pred (with grad) and du/dt together, on every
                        row (the r = t rows multiply it by 0). Needs model.attention = "math" (no forward-AD rule
                        for fused attention kernels) and does not run through FSDP2's hooks (docs/math.md §5.3).
    derivative = "dde"  TiM's central difference [u(x_t + εv, t + ε, r) - u(x_t - εv, t - ε, r)]/(2ε), two plain
                        no-grad forwards on the rows with r ≠ t: what runs under FSDP2.
Sampling: the same transition map as TiM, x_r = x_t - (t - r)·u (r = t_next; 1 step from noise: x_0 = z - u).
"""
from __future__ import annotations

import dataclasses

import torch

from tim_ray.config import TransitionConfig
from tim_ray.transition.objective import (assemble_loss, repa_on, target_velocity, transition_loss,
                                          working_dtype)
from tim_ray.transition.objectives.base import BACKWARD, COMMON_KEYS, FORWARD, JVP, Objective, guidance_forwards

# The loss MeanFlow is: TiM's with these switches (set here, so the config refuses them as unused keys).
MEANFLOW_LOSS = {"time_weight": "constant", "directional_loss": False}


class MeanFlow(Objective):
    name = "meanflow"
    uses = COMMON_KEYS | {"diffusion_ratio", "consistency_ratio", "derivative", "dde_epsilon", "dde_fp32_forwards",
                          "guidance_tangent"}
    sample_modes = ("transition", "diffusion")

    def loss(self, model, x, z, times, cond, *, path, config, guidance=None, repa_target=None):
        config = dataclasses.replace(config, **MEANFLOW_LOSS)
        if config.derivative == "dde":
            return transition_loss(model, x, z, times.t, times.r, cond, path=path, config=config,
                                   repa_target=repa_target, guidance=guidance)
        return jvp_loss(model, x, z, times.t, times.r, cond, path=path, config=config, guidance=guidance,
                        repa_target=repa_target)

    def forwards_per_row(self, config: TransitionConfig) -> float:
        """jvp: one jvp pass with grad on every row (primal + tangent) and the backward of its primal;
        dde: as TiM, 3 + 2 no-grad forwards on the rows with r ≠ t. Both plus the EMA forwards of guidance."""
        if config.derivative == "jvp":
            return JVP + BACKWARD + guidance_forwards(config)
        moving = 1.0 - min(config.diffusion_ratio, 1.0 - config.consistency_ratio)
        return FORWARD + BACKWARD + 2 * FORWARD * moving + guidance_forwards(config)

    def check(self, config: TransitionConfig) -> str | None:
        if config.path != "otfm":
            return (f"transition.objective = 'meanflow' is defined on the otfm path (x_r = x_t - (t - r)·u), got "
                    f"transition.path = {config.path!r}")
        return None


def jvp_loss(model, x, z, t, r, cond, *, path, config, guidance=None, repa_target=None):
    """The MeanFlow loss with (u_pred, du/dt) = torch.func.jvp(u, (x_t, t, r), (tangent, 1, 0)): the primal keeps
    its graph for the backward; the tangent output is detached (the target is a stop-gradient)."""
    dtype = working_dtype(x.dtype)
    x, z = x.to(dtype), z.to(dtype)
    x_t, v = path.interpolate(x, z, t), path.velocity(x, z, t)
    v_target, tangent = target_velocity(v, x_t, t, path=path, config=config, guidance=guidance)
    with_repa = repa_on(config, repa_target)

    def average_velocity(x_in, t_in, r_in):
        return model(x_in, t_in, r_in, return_repa=True, **cond) if with_repa else model(x_in, t_in, r_in, **cond)

    direction = v if tangent is None else tangent
    out, d_out = torch.func.jvp(average_velocity, (x_t, t, r), (direction, torch.ones_like(t), torch.zeros_like(r)))
    (F_pred, h_proj), dF_dt = (out, d_out[0]) if with_repa else ((out, None), d_out)
    dF_dt = dF_dt.detach().to(dtype)
    F_tgt = path.target(v_target, x_t, dF_dt, t, r).detach()
    return assemble_loss(F_pred, F_tgt, dF_dt, t, r, h_proj, repa_target, path=path, config=config)
