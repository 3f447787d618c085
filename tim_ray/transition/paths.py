"""Probability paths and the transition map of a Transition Model (docs/math.md §1-2).

A path interpolates between data `x` (at t = T_min = 0) and Gaussian noise `z` (at t = T_max):
    x_t = α_t·x + σ_t·z,        v = dx_t/dt = α̇_t·x + σ̇_t·z    (the conditional velocity).
A transition model F(x_t, t, r) predicts the jump from time t to an earlier time r ≤ t:
    x_r = A(t, r)·x_t + B(t, r)·F.
Along an exact trajectory x_r does not depend on t; differentiating in t with r fixed gives the training target
    F_tgt = v - (t - r)·dF/dt                          (OT-FM,    A = 1,          B = -(t - r))
    F_tgt = v - tan(t - r)·(x_t + dF/dt)               (TrigFlow, A = cos(t - r), B = -sin(t - r))
where dF/dt is the total derivative along the conditional path, tangent (dx, dt, dr) = (v, 1, 0).
When r = t both targets are v: plain flow matching.

Times `t`, `r` are per-sample tensors of shape (B,); they broadcast over the trailing dims of `x` (B, C, H, W).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """View a per-sample time (B,) as (B, 1, ..., 1) with `like.ndim` dims and `like`'s dtype."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class TransitionPath(ABC):
    """One interpolation x_t = α_t·x + σ_t·z with its transition map and target."""

    name: str
    t_min: float = 0.0
    t_max: float
    supports_stochastic: bool = False

    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α_t, σ_t, α̇_t, σ̇_t), each shaped like `t`."""

    @abstractmethod
    def time_from_sigma(self, sigma: Tensor) -> Tensor:
        """The time whose noise-to-signal ratio σ_t/α_t equals `sigma` (used to draw t from a log-normal σ)."""

    @abstractmethod
    def sigma_from_time(self, t: Tensor) -> Tensor:
        """The noise-to-signal ratio σ_t/α_t; the inverse of `time_from_sigma`."""

    @abstractmethod
    def transition(self, x_t: Tensor, F: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """The deterministic transition map x_r = A(t, r)·x_t + B(t, r)·F."""

    @abstractmethod
    def target(self, v: Tensor, x_t: Tensor, dF_dt: Tensor, t: Tensor, r: Tensor) -> Tensor:
        """The training target F_tgt built from the velocity `v` and the total derivative dF/dt (docs/math.md §3)."""

    def interpolate(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = α_t·x + σ_t·z."""
        alpha, sigma, _, _ = self.coefficients(t)
        return broadcast_time(alpha, x) * x + broadcast_time(sigma, x) * z

    def velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """v = dx_t/dt = α̇_t·x + σ̇_t·z."""
        _, _, d_alpha, d_sigma = self.coefficients(t)
        return broadcast_time(d_alpha, x) * x + broadcast_time(d_sigma, x) * z

    def stochastic_transition(self, x_t: Tensor, F: Tensor, t: Tensor, r: Tensor, ratio: float,
                              noise: Tensor) -> Tensor:
        """A transition with injected noise; only OT-FM defines one (docs/math.md §2)."""
        raise NotImplementedError(f"the {self.name} path has no stochastic transition; use stochasticity 0")


class OTFMPath(TransitionPath):
    """Optimal-transport flow matching: x_t = (1 - t)·x + t·z, t ∈ [0, 1], v = z - x."""

    name = "otfm"
    t_max = 1.0
    supports_stochastic = True

    def coefficients(self, t):
        """α_t = 1 - t, σ_t = t, α̇_t = -1, σ̇_t = 1."""
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def time_from_sigma(self, sigma):
        """t = σ/(1 + σ), the logistic map: a log-normal σ gives a logit-normal t."""
        return sigma / (1 + sigma)

    def sigma_from_time(self, t):
        """σ = t/(1 - t)."""
        return t / (1 - t)

    def transition(self, x_t, F, t, r):
        """x_r = x_t - (t - r)·F. F is the average velocity over [r, t]."""
        return x_t - broadcast_time(t - r, x_t) * F

    def target(self, v, x_t, dF_dt, t, r):
        """F_tgt = v - (t - r)·dF/dt."""
        return v - broadcast_time(t - r, v) * dF_dt

    def stochastic_transition(self, x_t, F, t, r, ratio, noise):
        """One Euler-Maruyama step of the reverse SDE with g(t)² = 2·s·t (s = `ratio`), Δ = t - r:
            ẑ   = x_t + (1 - t)·F                           (noise estimate, E[z | x_t] when F = u)
            x_r = x_t - Δ·F - s·Δ·ẑ + sqrt(2·s·t·Δ)·noise,   noise ~ N(0, I).
        With ratio = 0 this is `transition`."""
        delta, t_b = broadcast_time(t - r, x_t), broadcast_time(t, x_t)
        noise_estimate = x_t + (1 - t_b) * F
        drift = x_t - delta * F - ratio * delta * noise_estimate
        return drift + torch.sqrt(2 * ratio * t_b * delta) * noise


class TrigFlowPath(TransitionPath):
    """TrigFlow: x_t = cos t·x + sin t·z, t ∈ [0, π/2], v = -sin t·x + cos t·z."""

    name = "trigflow"
    t_max = math.pi / 2

    def coefficients(self, t):
        """α_t = cos t, σ_t = sin t, α̇_t = -sin t, σ̇_t = cos t."""
        return torch.cos(t), torch.sin(t), -torch.sin(t), torch.cos(t)

    def time_from_sigma(self, sigma):
        """t = atan(σ)."""
        return torch.atan(sigma)

    def sigma_from_time(self, t):
        """σ = tan t."""
        return torch.tan(t)

    def transition(self, x_t, F, t, r):
        """x_r = cos(t - r)·x_t - sin(t - r)·F."""
        delta = broadcast_time(t - r, x_t)
        return torch.cos(delta) * x_t - torch.sin(delta) * F

    def target(self, v, x_t, dF_dt, t, r):
        """F_tgt = v - tan(t - r)·(x_t + dF/dt)."""
        return v - torch.tan(broadcast_time(t - r, v)) * (x_t + dF_dt)


PATHS: dict[str, type[TransitionPath]] = {"otfm": OTFMPath, "trigflow": TrigFlowPath}


def get_path(name: str) -> TransitionPath:
    """The path registered under `name` (the config key `transition.path`)."""
    if name not in PATHS:
        raise ValueError(f"unknown transition path {name!r}; choose one of {', '.join(PATHS)}")
    return PATHS[name]()
