"""Closed forms of spec §10 in torch float64, written independently of tim_ray.transition (the tests' ground truth).

Data x ~ N(μ, s²I), noise z ~ N(0, I). Every callable model here follows the protocol `model(x_t, t, r, **cond)`.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Autouse in every transition test module (imported there). These tests are small; on a busy 2-core box
    torch's 2-thread pool ran them up to 50x slower than one thread (a 256-step sampler loop: 38 s vs 0.7 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianOTFM:
    """OT-FM x_t = (1-t)x + t z:  m_t = (1-t)μ, S_t = sqrt((1-t)²s² + t²), S'_t = (t - (1-t)s²)/S_t,
    u = -μ + (S'_t/S_t)(x - m_t),  Φ_{t→r}(x) = m_r + (S_r/S_t)(x - m_t),
    F*(x,t,r) = -μ + (x - m_t)(S_t - S_r)/(S_t(t - r)),  F*(x,t,t) = u."""

    def __init__(self, mu: Tensor, s: float):
        self.mu, self.s = mu, s

    def m(self, t, like):
        return (1 - per_sample(t, like)) * self.mu

    def S(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)

    def dS(self, t):
        return (t - (1 - t) * self.s ** 2) / self.S(t)

    def u(self, x, t):
        return -self.mu + per_sample(self.dS(t) / self.S(t), x) * (x - self.m(t, x))

    def flow(self, x, t, r):
        return self.m(r, x) + per_sample(self.S(r) / self.S(t), x) * (x - self.m(t, x))

    def slope(self, t, r):
        """c(t, r) = ∂_x F*, with the r = t limit S'_t/S_t."""
        same = t == r
        safe_gap = torch.where(same, torch.ones_like(t), t - r)
        c = (self.S(t) - self.S(r)) / (self.S(t) * safe_gap)
        return torch.where(same, self.dS(t) / self.S(t), c)

    def __call__(self, x, t, r, **cond):
        return -self.mu + per_sample(self.slope(t, r), x) * (x - self.m(t, x))

    def dF_dt(self, x, t, r, tangent):
        """Total derivative of F*(x(t), t, r) with dx/dt = tangent, r fixed (t ≠ r)."""
        St, Sr, dSt, gap = self.S(t), self.S(r), self.dS(t), t - r
        c = (St - Sr) / (St * gap)
        dc = (dSt * gap - (St - Sr)) / (St * gap ** 2) - (St - Sr) * dSt / (St ** 2 * gap)
        return per_sample(dc, x) * (x - self.m(t, x)) + per_sample(c, x) * (tangent + self.mu)

    def mse_floor(self, t: float, r: float) -> float:
        """Per-dim E(F_tgt - F*)² = (S_r/S_t)²[1 + s² - (t - (1-t)s²)²/S_t²] (spec O2d)."""
        St = math.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)
        Sr = math.sqrt((1 - r) ** 2 * self.s ** 2 + r ** 2)
        return (Sr / St) ** 2 * (1 + self.s ** 2 - (t - (1 - t) * self.s ** 2) ** 2 / St ** 2)


class GaussianTrigFlow:
    """TrigFlow x_t = cos t x + sin t z:  m_t = cos t μ, S_t² = cos²t s² + sin²t, Φ as for OT-FM,
    F*_T(x,t,r) = (cos(t-r)x - Φ_{t→r}(x))/sin(t-r),  u_T = -sin t μ + sin t cos t (1-s²)/S_t² (x - m_t)."""

    def __init__(self, mu: Tensor, s: float):
        self.mu, self.s = mu, s

    def m(self, t, like):
        return torch.cos(per_sample(t, like)) * self.mu

    def S(self, t):
        return torch.sqrt(torch.cos(t) ** 2 * self.s ** 2 + torch.sin(t) ** 2)

    def u(self, x, t):
        gain = torch.sin(t) * torch.cos(t) * (1 - self.s ** 2) / self.S(t) ** 2
        return -torch.sin(per_sample(t, x)) * self.mu + per_sample(gain, x) * (x - self.m(t, x))

    def flow(self, x, t, r):
        return self.m(r, x) + per_sample(self.S(r) / self.S(t), x) * (x - self.m(t, x))

    def __call__(self, x, t, r, **cond):
        gap = per_sample(t - r, x)
        return (torch.cos(gap) * x - self.flow(x, t, r)) / torch.sin(gap)


def gaussian_batch(model, n: int, shape: tuple[int, ...], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(x, z): x ~ N(μ, s²I) and z ~ N(0, I), float64, shape (n, *shape)."""
    x = model.mu + model.s * torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    z = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    return x, z


class SmoothNet(torch.nn.Module):
    """A small smooth MLP on [x_flat, t, t - r] (float64): F = W2·tanh(W1·[x, t, t-r] + b)."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        size = math.prod(shape)
        self.shape = shape
        self.hidden = torch.nn.Linear(size + 2, hidden, dtype=torch.float64)
        self.out = torch.nn.Linear(hidden, size, dtype=torch.float64)

    def forward(self, x, t, r, **cond):
        features = torch.cat([x.flatten(1), t[:, None], (t - r)[:, None]], dim=1)
        return self.out(torch.tanh(self.hidden(features))).reshape(x.shape)


class TinyAttentionNet(torch.nn.Module):
    """Self-attention over the H·W tokens of x, modulated by sinusoidal embeddings of t and t - r (float64)."""

    def __init__(self, channels: int, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("freqs", torch.exp(-math.log(100.0) * torch.arange(4, dtype=torch.float64) / 4))
        self.embed = torch.nn.Linear(16, 2 * width, dtype=torch.float64)
        self.inp = torch.nn.Linear(channels, width, dtype=torch.float64)
        self.qkv = torch.nn.Linear(width, 3 * width, dtype=torch.float64)
        self.out = torch.nn.Linear(width, channels, dtype=torch.float64)

    def forward(self, x, t, r, **cond):
        batch, channels, height, width = x.shape
        angles = torch.cat([t[:, None] * self.freqs, (t - r)[:, None] * self.freqs], dim=1)
        scale, shift = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1)).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.inp(x.flatten(2).transpose(1, 2)) * (1 + scale) + shift
        q, k, v = self.qkv(torch.tanh(tokens)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out(attention @ v).transpose(1, 2).reshape(batch, channels, height, width)


SHAPE = (3, 2, 2)  # the per-sample shape of the shared Gaussian fixture
DTYPE = torch.float64


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def gaussian(gen):
    return GaussianOTFM(torch.randn(SHAPE, generator=gen, dtype=DTYPE), 0.7)
