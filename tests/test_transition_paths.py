"""Paths and transition maps against the Gaussian closed forms (spec §2, oracles O1, O3, O5, O6a)."""
import math

import pytest
import torch

from tim_ray.transition.paths import OTFMPath, TrigFlowPath, get_path
from transition_closed_forms import gaussian, gen, one_torch_thread  # noqa: F401 (fixtures)
from transition_closed_forms import DTYPE, SHAPE, GaussianTrigFlow, gaussian_batch



def pairs(n, gen, t_lo=0.05, t_hi=0.999, min_gap=1e-3):
    t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=gen, dtype=DTYPE)
    r = (t - min_gap) * torch.rand(n, generator=gen, dtype=DTYPE)
    return t, r


def test_registry_and_constants():
    assert isinstance(get_path("otfm"), OTFMPath) and isinstance(get_path("trigflow"), TrigFlowPath)
    assert (get_path("otfm").t_min, get_path("otfm").t_max) == (0.0, 1.0)
    assert get_path("trigflow").t_max == math.pi / 2
    with pytest.raises(ValueError, match="otfm"):
        get_path("edm")


def test_otfm_interpolant_and_velocity(gen):
    path, (x, z) = OTFMPath(), (torch.randn(4, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=DTYPE)
    torch.testing.assert_close(path.interpolate(x, z, t), (1 - t)[:, None, None, None] * x + t[:, None, None, None] * z)
    torch.testing.assert_close(path.velocity(x, z, t), z - x)
    assert torch.equal(path.interpolate(x, z, t)[0], x[0]) and torch.equal(path.interpolate(x, z, t)[3], z[3])


def test_trigflow_interpolant_and_velocity(gen):
    path, (x, z) = TrigFlowPath(), (torch.randn(3, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = torch.tensor([0.3, 0.9, math.pi / 2], dtype=DTYPE)
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    torch.testing.assert_close(path.interpolate(x, z, t), c * x + s * z)
    torch.testing.assert_close(path.velocity(x, z, t), c * z - s * x)


@pytest.mark.parametrize("path", [OTFMPath(), TrigFlowPath()])
def test_sigma_time_maps_are_inverse(path):
    t = torch.linspace(0.01, path.t_max - 0.01, 50, dtype=DTYPE)
    torch.testing.assert_close(path.time_from_sigma(path.sigma_from_time(t)), t, rtol=0, atol=1e-12)
    alpha, sigma, _, _ = path.coefficients(t)
    torch.testing.assert_close(path.sigma_from_time(t), sigma / alpha)


def test_o1_otfm_identity_with_marginal_velocity(gaussian, gen):
    """F* = u - (t - r)·dF*/dt along the true flow (tangent u): our target with (u, dF*/dt) returns F*."""
    x, z = gaussian_batch(gaussian, 200, SHAPE, gen)
    t, r = pairs(200, gen)
    x_t = OTFMPath().interpolate(x, z, t)
    u = gaussian.u(x_t, t)
    target = OTFMPath().target(u, x_t, gaussian.dF_dt(x_t, t, r, u), t, r)
    assert (target - gaussian(x_t, t, r)).abs().max() < 1e-12


def test_o1_trigflow_identity_with_marginal_velocity(gen):
    """F*_T = u - tan(t - r)·(x_t + dF*/dt), dF*/dt by a 1e-4 central difference along the exact flow."""
    gaussian = GaussianTrigFlow(torch.randn(SHAPE, generator=gen, dtype=DTYPE), 0.7)
    x, z = gaussian_batch(gaussian, 100, SHAPE, gen)
    t = 0.1 + 1.4 * torch.rand(100, generator=gen, dtype=DTYPE)
    r = (t - 1e-2) * torch.rand(100, generator=gen, dtype=DTYPE)
    path, e = TrigFlowPath(), 1e-4
    x_t = path.interpolate(x, z, t)
    dF = (gaussian(gaussian.flow(x_t, t, t + e), t + e, r) - gaussian(gaussian.flow(x_t, t, t - e), t - e, r)) / (2 * e)
    target = path.target(gaussian.u(x_t, t), x_t, dF, t, r)
    assert (target - gaussian(x_t, t, r)).abs().max() < 1e-7


@pytest.mark.parametrize("path", [OTFMPath(), TrigFlowPath()])
def test_o3_target_at_r_equals_t_is_the_velocity(path, gen):
    x, z = torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE), torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE)
    t = torch.rand(8, generator=gen, dtype=DTYPE)
    x_t, anything = path.interpolate(x, z, t), torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE)
    t_b = t[:, None, None, None]
    expected = z - x if path.name == "otfm" else torch.cos(t_b) * z - torch.sin(t_b) * x
    assert torch.equal(path.target(path.velocity(x, z, t), x_t, anything * 0, t, t), path.velocity(x, z, t))
    torch.testing.assert_close(path.target(path.velocity(x, z, t), x_t, anything, t, t), expected, rtol=0, atol=1e-15)


def test_o5_composition_and_exact_flow_map(gaussian, gen):
    """One jump t→r equals two jumps t→s→r, and equals the exact flow map Φ_{t→r}."""
    x, z = gaussian_batch(gaussian, 200, SHAPE, gen)
    t, r = pairs(200, gen)
    s = r + (t - r) * torch.rand(200, generator=gen, dtype=DTYPE)
    path = OTFMPath()
    x_t = path.interpolate(x, z, t)
    one_jump = path.transition(x_t, gaussian(x_t, t, r), t, r)
    x_s = path.transition(x_t, gaussian(x_t, t, s), t, s)
    two_jumps = path.transition(x_s, gaussian(x_s, s, r), s, r)
    assert (one_jump - two_jumps).abs().max() < 1e-12
    assert (one_jump - gaussian.flow(x_t, t, r)).abs().max() < 1e-12


def test_trigflow_transition_is_the_exact_flow_map(gen):
    gaussian = GaussianTrigFlow(torch.randn(SHAPE, generator=gen, dtype=DTYPE), 0.7)
    x, z = gaussian_batch(gaussian, 100, SHAPE, gen)
    t = 0.1 + 1.4 * torch.rand(100, generator=gen, dtype=DTYPE)
    r = (t - 1e-2) * torch.rand(100, generator=gen, dtype=DTYPE)
    x_t = TrigFlowPath().interpolate(x, z, t)
    jumped = TrigFlowPath().transition(x_t, gaussian(x_t, t, r), t, r)
    assert (jumped - gaussian.flow(x_t, t, r)).abs().max() < 1e-12


def test_o6a_recomputed_path_equals_x_t_plus_minus_eps_v(gen):
    path, eps = OTFMPath(), 0.005
    x, z = torch.randn(50, *SHAPE, generator=gen, dtype=DTYPE), torch.randn(50, *SHAPE, generator=gen, dtype=DTYPE)
    t = 0.01 + 0.98 * torch.rand(50, generator=gen, dtype=DTYPE)
    x_t, v = path.interpolate(x, z, t), path.velocity(x, z, t)
    assert (path.interpolate(x, z, t + eps) - (x_t + eps * v)).abs().max() < 1e-13
    assert (path.interpolate(x, z, t - eps) - (x_t - eps * v)).abs().max() < 1e-13


def test_stochastic_transition_formula(gen):
    """x_r = x_t - Δ F - s Δ (x_t + (1 - t) F) + sqrt(2 s t Δ) ε; with s = 0 it is the deterministic map."""
    path = OTFMPath()
    x_t, F, noise = (torch.randn(4, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(3))
    t, r, s = torch.tensor([0.9, 0.7, 0.5, 0.2], dtype=DTYPE), torch.tensor([0.8, 0.1, 0.45, 0.0], dtype=DTYPE), 0.2
    torch.testing.assert_close(path.stochastic_transition(x_t, F, t, r, 0.0, noise), path.transition(x_t, F, t, r))
    d, tb = (t - r)[:, None, None, None], t[:, None, None, None]
    expected = x_t - d * F - s * d * (x_t + (1 - tb) * F) + torch.sqrt(2 * s * tb * d) * noise
    torch.testing.assert_close(path.stochastic_transition(x_t, F, t, r, s, noise), expected, rtol=0, atol=1e-14)
    with pytest.raises(NotImplementedError):
        TrigFlowPath().stochastic_transition(x_t, F, t, r, s, noise)


def test_float32_inputs_stay_float32():
    x = torch.randn(2, *SHAPE)
    t = torch.tensor([0.3, 0.6])
    for path in (OTFMPath(), TrigFlowPath()):
        assert path.interpolate(x, x, t).dtype == torch.float32
        assert path.transition(x, x, t, t * 0).dtype == torch.float32
