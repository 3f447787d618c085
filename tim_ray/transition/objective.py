"""The transition training objective (docs/math.md §3, §6, §8-9), one call per micro-batch.

    x_t = interpolate(x, z, t),  v = velocity(x, z, t)
    dF/dt  total derivative of the online network along the conditional path, tangent (v, 1, 0), no grad,
           only on rows with r ≠ t (zero elsewhere): DDE (finite difference, default) or JVP (torch.func, checks)
    ṽ      v, or the enhanced target (model guidance) mixing in an EMA network's cond/uncond velocities
    F_tgt  path.target(ṽ, x_t, dF/dt, t, r)                  (= v on rows with r = t)
    L_i    mean_{c,h,w}(F_pred - F_tgt)²  [+ mean_{h,w}(1 - cos_c(F_pred, F_tgt))]
    loss   mean_i(w_i·a_i·L_i) + repa_coeff·mean_{i,n}(1 - cos(h_proj, h_tgt))
with w_i the time weight (1 on rows with r = t) and a_i = 1/(sg(L_i) + 1e-5) the adaptive weight.

The model protocol: `model(x_t, t, r, **cond) -> F`, and `model(x_t, t, r, return_repa=True, **cond) -> (F, h)`
when REPA features are needed. `cond` is passed through untouched except that tensors whose first dim is the batch
are row-sliced (into new dicts) for the passes that run on a subset of rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor

from tim_ray.config import TransitionConfig
from tim_ray.transition.intervals import row_types
from tim_ray.transition.paths import TransitionPath, broadcast_time

Model = Callable[..., Tensor]
ADAPTIVE_EPS = 1e-5


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the inputs are float64: bf16/fp16 never carry a difference or a loss."""
    return torch.promote_types(dtype, torch.float32)


def select_rows(cond: dict, rows: Tensor, batch: int) -> dict:
    """A new dict with every tensor whose first dim is `batch` indexed by `rows`; other values unchanged."""
    return {key: value[rows] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value
            for key, value in cond.items()}


@torch.no_grad()
def dde_time_derivative(model: Model, x: Tensor, z: Tensor, t: Tensor, r: Tensor, cond: dict | None = None, *,
                        path: TransitionPath, epsilon: float, fp32_forwards: bool = False,
                        tangent: Tensor | None = None) -> Tensor:
    """Differential derivation estimate (DDE) of dF/dt along the conditional path, in at least float32:
        dF/dt ≈ [F(x_hi, t_hi, r) - F(x_lo, t_lo, r)] / (t_hi - t_lo),   x_s = interpolate(x, z, s),
        t_hi = min(t + ε, T_max),  t_lo = max(t - ε, r).
    This is the central difference (error O(ε²)) wherever t - ε ≥ r and t + ε ≤ T_max. Closer to r (B8) the
    lower point stops at r, so the network never sees r > t; the quotient is then first-order, and its error enters
    the target multiplied by t - r < ε. Likewise the upper point never passes T_max.
    Two no-grad forwards of `model` itself (pass the FSDP-wrapped module), only on rows with r ≠ t. The difference
    and the division are taken in at least float32 (docs/math.md B2). The forwards run in the caller's autocast unless
    `fp32_forwards`, which switches autocast off for them: bf16 rounding of F dominates the error otherwise
    (~2⁻⁹·|F|/ε), but parameters that FSDP casts to bf16 stay bf16. Rows with r = t get 0.
    With `tangent` (B, C, H, W) the points lie on the straight line x_s = x_t + (s - t)·tangent instead: the
    derivative along (tangent, 1, 0), e.g. the guided velocity ṽ (docs/math.md §6, B6). For OT-FM and tangent v
    that line is the path itself.
    """
    cond = cond or {}
    dtype = working_dtype(x.dtype)
    derivative = torch.zeros(x.shape, dtype=dtype, device=x.device)
    rows = (r != t).nonzero().squeeze(1)
    if rows.numel() == 0:
        return derivative
    x_rows, z_rows, t_rows, r_rows = x[rows], z[rows], t[rows], r[rows]
    cond_rows = select_rows(cond, rows, x.shape[0])
    t_hi = torch.clamp(t_rows + epsilon, max=path.t_max)
    t_lo = torch.maximum(t_rows - epsilon, r_rows)
    if tangent is None:
        x_hi, x_lo = path.interpolate(x_rows, z_rows, t_hi), path.interpolate(x_rows, z_rows, t_lo)
    else:
        x_t, direction = path.interpolate(x_rows, z_rows, t_rows), tangent[rows]
        x_hi = x_t + broadcast_time(t_hi - t_rows, x_t) * direction
        x_lo = x_t + broadcast_time(t_lo - t_rows, x_t) * direction
    with torch.autocast(x.device.type, enabled=False) if fp32_forwards else contextlib.nullcontext():
        F_hi = model(x_hi, t_hi, r_rows, **cond_rows).to(dtype)
        F_lo = model(x_lo, t_lo, r_rows, **cond_rows).to(dtype)
    width = broadcast_time((t_hi - t_lo).to(dtype), F_hi)
    derivative[rows] = (F_hi - F_lo) / width
    return derivative


@torch.no_grad()
def jvp_time_derivative(model: Model, x: Tensor, z: Tensor, t: Tensor, r: Tensor, cond: dict | None = None, *,
                        path: TransitionPath, tangent: Tensor | None = None) -> Tensor:
    """Exact dF/dt = ∂_xF·v + ∂_tF by forward-mode AD: torch.func.jvp(F, (x_t, t, r), (v, 1, 0)), with
    `tangent` in place of v when given.
    Only on rows with r ≠ t (0 elsewhere), in the dtype of `x`. Needs a network whose every op has a forward-AD
    rule (math attention; no FSDP hooks): for checks and benchmarks, not for sharded training."""
    cond = cond or {}
    derivative = torch.zeros_like(x)
    rows = (r != t).nonzero().squeeze(1)
    if rows.numel() == 0:
        return derivative
    x_rows, z_rows, t_rows, r_rows = x[rows], z[rows], t[rows], r[rows]
    cond_rows = select_rows(cond, rows, x.shape[0])
    x_t = path.interpolate(x_rows, z_rows, t_rows)
    v = path.velocity(x_rows, z_rows, t_rows) if tangent is None else tangent[rows].to(x_t.dtype)

    def along_path(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
        return model(x_in, t_in, r_in, **cond_rows)

    tangents = (v, torch.ones_like(t_rows), torch.zeros_like(r_rows))
    _, derivative[rows] = torch.func.jvp(along_path, (x_t, t_rows, r_rows), tangents)
    return derivative


@dataclass
class ModelGuidance:
    """What the enhanced target needs: the EMA network, the true condition and the null condition."""

    model: Model
    cond: dict
    uncond: dict


@torch.no_grad()
def enhanced_velocity(v: Tensor, x_t: Tensor, t: Tensor, guidance: ModelGuidance, *, w_gt: float, w_cond: float,
                      window: tuple[float, float], t_max: float) -> Tensor:
    """The enhanced ("model guidance") velocity (docs/math.md §6) on rows with lo·T_max ≤ t ≤ hi·T_max (r is not read):
        ṽ = w_gt·v + w_cond·F_ema(x_t, t, t | c) + (1 - w_gt - w_cond)·F_ema(x_t, t, t | ∅),
    and ṽ = v on the other rows. The EMA network is queried with r = t (its instantaneous velocity). It runs on the
    whole batch, so every rank makes the same calls whatever its t (a sharded EMA needs that); the uncond forward
    is skipped when its coefficient is 0."""
    dtype = working_dtype(v.dtype)
    inside = ((t >= window[0] * t_max) & (t <= window[1] * t_max)).reshape(-1, *([1] * (v.ndim - 1)))
    mixed = w_gt * v.to(dtype) + w_cond * guidance.model(x_t, t, t, **guidance.cond).to(dtype)
    w_uncond = 1.0 - w_gt - w_cond
    if w_uncond != 0:
        mixed = mixed + w_uncond * guidance.model(x_t, t, t, **guidance.uncond).to(dtype)
    return torch.where(inside, mixed, v.to(dtype))


def transition_target(model: Model, x: Tensor, z: Tensor, t: Tensor, r: Tensor, cond: dict | None = None, *,
                      path: TransitionPath, config: TransitionConfig,
                      guidance: ModelGuidance | None = None) -> tuple[Tensor, Tensor]:
    """(F_tgt, dF/dt), both detached, in at least float32: F_tgt = path.target(ṽ, x_t, dF/dt, t, r) with the
    configured derivative (`dde` | `jvp`), and ṽ the enhanced velocity when guidance_w_cond ≠ 0, else v.
    Rows with r = t get F_tgt = v and cost no derivative forward."""
    dtype = working_dtype(x.dtype)
    x, z = x.to(dtype), z.to(dtype)
    x_t, v = path.interpolate(x, z, t), path.velocity(x, z, t)
    v, tangent = target_velocity(v, x_t, t, path=path, config=config, guidance=guidance)
    if config.derivative == "dde":
        dF_dt = dde_time_derivative(model, x, z, t, r, cond, path=path, epsilon=config.dde_epsilon,
                                    fp32_forwards=config.dde_fp32_forwards, tangent=tangent)
    elif config.derivative == "jvp":
        dF_dt = jvp_time_derivative(model, x, z, t, r, cond, path=path, tangent=tangent).to(dtype)
    else:
        raise ValueError(f"unknown derivative {config.derivative!r}; choose dde or jvp")
    return path.target(v, x_t, dF_dt, t, r).detach(), dF_dt


def target_velocity(v: Tensor, x_t: Tensor, t: Tensor, *, path: TransitionPath, config: TransitionConfig,
                    guidance: ModelGuidance | None) -> tuple[Tensor, Tensor | None]:
    """(ṽ, the derivative's tangent or None for the path's own v): ṽ = v unless guidance_w_cond ≠ 0, then the
    enhanced velocity. The tangent is ṽ only with guidance_tangent = "guided"; the official recipe keeps v (B6)."""
    if config.guidance_w_cond == 0:
        return v, None
    if guidance is None:
        raise ValueError("transition.guidance_w_cond ≠ 0 needs a ModelGuidance (EMA model, cond, uncond)")
    guided = enhanced_velocity(v, x_t, t, guidance, w_gt=config.guidance_w_gt, w_cond=config.guidance_w_cond,
                               window=tuple(config.guidance_window), t_max=path.t_max)
    return guided, guided if config.guidance_tangent == "guided" else None


TIME_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "tangent": torch.tan,  # the σ-map of TrigFlow; what the official configs use, also with OT-FM
    "sigmoid": lambda t: t / (1 - t),  # the σ-map of OT-FM
    "none": lambda t: t,
}
TIME_WEIGHTS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "constant": lambda delta, sigma_d: torch.ones_like(delta),
    "reciprocal": lambda delta, sigma_d: 1 / (delta + sigma_d),
    "sqrt": lambda delta, sigma_d: 1 / torch.sqrt(delta + sigma_d),
    "square": lambda delta, sigma_d: 1 / (delta + sigma_d) ** 2,
    "soft_min_snr": lambda delta, sigma_d: 1 / (delta ** 2 + sigma_d ** 2),
}


def time_weight(t: Tensor, r: Tensor, *, kind: str = "sqrt", time_map: str = "tangent", weight_t_and_r: bool = True,
                sigma_d: float = 1.0) -> Tensor:
    """w(t, r), shape (B,). With m the time map (tangent: tan, sigmoid: t/(1-t), none) and δ = m(t) - m(r)
    (or δ = m(t) when not weight_t_and_r):
        constant 1 | reciprocal 1/(δ+σ_d) | sqrt 1/sqrt(δ+σ_d) | square 1/(δ+σ_d)² | soft_min_snr 1/(δ²+σ_d²).
    Rows with r = t (diffusion rows) get 1. The t2i/c2i recipe, sqrt + tangent, σ_d = 1: w = (1 + tan t - tan r)^-½.
    """
    mapped_t, mapped_r = TIME_MAPS[time_map](t), TIME_MAPS[time_map](r)
    delta = mapped_t - mapped_r if weight_t_and_r else mapped_t
    return torch.where(r == t, torch.ones_like(t), TIME_WEIGHTS[kind](delta, sigma_d))


def adaptive_weight(per_sample_loss: Tensor, eps: float = ADAPTIVE_EPS) -> Tensor:
    """a_i = 1/(sg(L_i) + eps). So ∇(a_i·L_i) = ∇L_i/(L_i + eps) = ∇log(L_i + eps)."""
    return 1 / (per_sample_loss.detach() + eps)


def per_sample_losses(F_pred: Tensor, F_tgt: Tensor) -> tuple[Tensor, Tensor]:
    """(mse_i, directional_i), shape (B,) each: mean_{c,h,w}(F_pred - F_tgt)² and mean_{h,w}(1 - cos_c(F_pred, F_tgt)),
    the cosine taken over the channel dim (dim 1) at each position.

    With one channel (grey pixels) the cosine of two scalars is only the product of their signs: its gradient is
    zero except near F_pred = 0, where it scales as 1/|F_pred| (a zero-initialised output gave a gradient norm of
    1e7 on the first Fashion-MNIST step). So directional_i is 0 there (docs/decisions.md, B12)."""
    batch = F_pred.shape[0]
    mse = (F_pred - F_tgt).pow(2).reshape(batch, -1).mean(1)
    if F_pred.shape[1] == 1:
        return mse, torch.zeros_like(mse)
    directional = (1 - nnf.cosine_similarity(F_pred, F_tgt, dim=1)).reshape(batch, -1).mean(1)
    return mse, directional


def repa_loss(h_proj: Tensor, h_target: Tensor) -> Tensor:
    """mean over rows and tokens of 1 - cos(h_proj, h_target), the cosine over the feature (last) dim."""
    dtype = working_dtype(h_proj.dtype)
    return (1 - nnf.cosine_similarity(h_proj.to(dtype), h_target.to(dtype), dim=-1)).mean()


@dataclass
class TransitionLoss:
    """`loss` is the differentiable total; every other field is a detached scalar for logging. Per-row-type means
    (of L_i, without weights) are NaN when the batch has no row of that type; check only `loss` for non-finite."""

    loss: Tensor
    mse: Tensor  # mean_i mse_i: the raw "denoising" MSE, the curve to watch (weighted loss ≈ mean w: B10)
    directional: Tensor  # mean_i directional_i (computed, and logged, even when not in the loss)
    diffusion: Tensor  # mean L_i over rows with r = t
    transition: Tensor  # mean L_i over rows with T_min < r < t
    consistency: Tensor  # mean L_i over rows with r = T_min < t
    repa: Tensor  # the REPA term before its coefficient; 0 when off
    mean_weight: Tensor  # mean_i w_i (time weight only)
    derivative_rms: Tensor  # rms of dF/dt over rows with r ≠ t: a blow-up: the DDE is noise (docs/math.md §3)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Every field as a float, with a single device sync: for the logger."""
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, name).detach().to(torch.float64) for name in names]).tolist()
        return {prefix + name: value for name, value in zip(names, values)}


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over `mask` rows; NaN (0/0) when the mask is empty."""
    return (values * mask).sum() / mask.sum()


def transition_loss(model: Model, x: Tensor, z: Tensor, t: Tensor, r: Tensor, cond: dict | None = None, *,
                    path: TransitionPath, config: TransitionConfig, repa_target: Tensor | None = None,
                    guidance: ModelGuidance | None = None) -> TransitionLoss:
    """The full objective for data `x`, noise `z` (B, C, H, W) and times t, r (B,). The target passes run first
    (no grad, freeing their activations before the grad forward). REPA is on when `repa_target` (B, N, D) is given
    and repa_coeff > 0; the enhanced target when guidance_w_cond ≠ 0 (then `guidance` is required)."""
    cond = cond or {}
    F_tgt, dF_dt = transition_target(model, x, z, t, r, cond, path=path, config=config, guidance=guidance)
    dtype = working_dtype(x.dtype)
    x_t = path.interpolate(x.to(dtype), z.to(dtype), t)
    if repa_on(config, repa_target):
        F_pred, h_proj = model(x_t, t, r, return_repa=True, **cond)
    else:
        F_pred, h_proj = model(x_t, t, r, **cond), None
    return assemble_loss(F_pred, F_tgt, dF_dt, t, r, h_proj, repa_target, path=path, config=config)


def repa_on(config: TransitionConfig, repa_target: Tensor | None) -> bool:
    """The REPA term is on when its target features are given and repa_coeff > 0."""
    return repa_target is not None and config.repa_coeff > 0


def assemble_loss(F_pred: Tensor, F_tgt: Tensor, dF_dt: Tensor, t: Tensor, r: Tensor, h_proj: Tensor | None,
                  repa_target: Tensor | None, *, path: TransitionPath, config: TransitionConfig) -> TransitionLoss:
    """The loss and its parts from a prediction (with grad), its detached target and derivative, and the REPA
    projection `h_proj` (None when REPA is off): mean_i(w_i·a_i·L_i) + repa_coeff·L_repa."""
    dtype = working_dtype(F_tgt.dtype)
    use_repa = h_proj is not None
    repa = repa_loss(h_proj, repa_target) if use_repa else F_tgt.new_zeros(())
    mse, directional = per_sample_losses(F_pred.to(dtype), F_tgt)
    per_sample = mse + directional if config.directional_loss else mse
    weight = time_weight(t, r, kind=config.time_weight, time_map=config.time_weight_map,
                         weight_t_and_r=config.weight_t_and_r, sigma_d=config.sigma_d).to(dtype)
    scaled = per_sample * adaptive_weight(per_sample) if config.adaptive_weight else per_sample
    total = (weight * scaled).mean() + (config.repa_coeff * repa if use_repa else 0.0)
    diffusion, consistency, transition = row_types(t, r, path.t_min)
    moving = ~diffusion
    rms = _masked_mean(dF_dt.pow(2).reshape(len(t), -1).mean(1), moving).sqrt()
    per_sample = per_sample.detach()
    return TransitionLoss(
        loss=total, mse=mse.detach().mean(), directional=directional.detach().mean(),
        diffusion=_masked_mean(per_sample, diffusion), transition=_masked_mean(per_sample, transition),
        consistency=_masked_mean(per_sample, consistency), repa=repa.detach(), mean_weight=weight.mean(),
        derivative_rms=rms)

