"""The objective registry (docs/math.md §5): TiM and flow matching unchanged, MeanFlow against the Gaussian
closed form, the compute accounting, and the config's refusal of keys an objective does not use."""
import dataclasses

import numpy as np
import pytest
import torch

from tim_ray.config import ConfigError, TransitionConfig, load_config
from tim_ray.transition.intervals import sample_intervals
from tim_ray.transition.objective import (dde_time_derivative, jvp_time_derivative, transition_loss,
                                          transition_target)
from tim_ray.transition.objectives import OBJECTIVES, get_objective
from tim_ray.transition.objectives.meanflow import jvp_loss
from tim_ray.transition.paths import OTFMPath
from tim_ray.transition.sampler import MODES
from transition_closed_forms import DTYPE, SHAPE, SmoothNet, gaussian_batch
from transition_closed_forms import gaussian, gen, one_torch_thread  # noqa: F401 (fixtures)
from transition_closed_forms import per_sample as broadcast

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
PATH = OTFMPath()


def config(**overrides):
    return dataclasses.replace(TransitionConfig(), **overrides)


def draws(objective, cfg, n=16):
    return get_objective(objective).draw_times(n, PATH, cfg, torch.Generator().manual_seed(3))


def test_registry_names_and_sampler_rules():
    assert list(OBJECTIVES) == ["tim", "flow_matching", "meanflow"]
    assert all(set(o.sample_modes) <= set(MODES) for o in OBJECTIVES.values())
    assert get_objective("flow_matching").sample_modes == ("diffusion",)  # trained on r = t only
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("rectified")


def test_tim_is_the_transition_loss_bit_for_bit(gen):
    net, cfg = SmoothNet(SHAPE), config()
    x, z = (torch.randn(12, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    times = draws("tim", cfg, 12)
    ours = get_objective("tim").loss(net, x, z, times, {}, path=PATH, config=cfg)
    theirs = transition_loss(net, x, z, times.t, times.r, path=PATH, config=cfg)
    assert torch.equal(ours.loss, theirs.loss)


def test_flow_matching_reproduces_the_diffusion_ratio_one_emulation(gen):
    cfg = config(objective="flow_matching")
    emulation = config(diffusion_ratio=1.0, consistency_ratio=0.0)
    times, emulated = draws("flow_matching", cfg), sample_intervals(16, PATH, emulation,
                                                                     torch.Generator().manual_seed(3))
    assert torch.equal(times.t, emulated.t) and torch.equal(times.r, times.t)
    net = SmoothNet(SHAPE)
    x, z = (torch.randn(16, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    ours = get_objective("flow_matching").loss(net, x, z, times, {}, path=PATH, config=cfg)
    assert torch.equal(ours.loss, transition_loss(net, x, z, times.t, times.r, path=PATH, config=emulation).loss)
    with pytest.raises(ValueError, match="r = t only"):
        get_objective("flow_matching").loss(net, x, z, draws("tim", config()), {}, path=PATH, config=cfg)


def average_velocity_by_quadrature(gaussian, x_t, t, r, nodes=64):
    """(x_t - x_r)/(t - r) with x_r = x_t - ∫_r^t u(x(s), s) ds along the exact flow (Gauss-Legendre in s)."""
    points, weights = (torch.as_tensor(a, dtype=DTYPE) for a in np.polynomial.legendre.leggauss(nodes))
    total = torch.zeros_like(x_t)
    for point, weight in zip(points, weights):
        s = r + (t - r) * (point + 1) / 2
        total = total + weight * (t - r).reshape(-1, 1, 1, 1) / 2 * gaussian.u(gaussian.flow(x_t, t, s), s)
    return total / broadcast(t - r, x_t)


def test_gaussian_average_velocity_is_the_closed_form(gaussian, gen):
    """The oracle MeanFlow is tested against: the closed form F*(x, t, r) is the integral of the marginal
    velocity along the exact flow over [r, t] divided by t - r."""
    x, z = gaussian_batch(gaussian, 8, SHAPE, gen)
    t = 0.2 + 0.75 * torch.rand(8, generator=gen, dtype=DTYPE)
    r = t * torch.rand(8, generator=gen, dtype=DTYPE)
    x_t = PATH.interpolate(x, z, t)
    torch.testing.assert_close(average_velocity_by_quadrature(gaussian, x_t, t, r), gaussian(x_t, t, r),
                               rtol=0, atol=1e-12)


def exact_meanflow_mse(gaussian, x, z, t, r):
    """At u = F*, u_tgt - F* = (S_r/S_t)(v - u(x_t, t)) (oracle O2), so the MSE has this closed form."""
    x_t, v = PATH.interpolate(x, z, t), PATH.velocity(x, z, t)
    residual = broadcast(gaussian.S(r) / gaussian.S(t), x) * (v - gaussian.u(x_t, t))
    return residual.pow(2).flatten(1).mean(1)


def test_meanflow_jvp_target_is_exact_on_the_gaussian(gaussian, gen):
    """With u = F* (the exact average velocity) the fused JVP gives u_tgt - F* = (S_r/S_t)(v - u), r = t rows too."""
    x, z = gaussian_batch(gaussian, 64, SHAPE, gen)
    t = 0.05 + 0.9 * torch.rand(64, generator=gen, dtype=DTYPE)
    r = torch.where(torch.arange(64) < 16, t, t * torch.rand(64, generator=gen, dtype=DTYPE))
    cfg = config(objective="meanflow", derivative="jvp", adaptive_weight=False)
    out = get_objective("meanflow").loss(gaussian, x, z, draws_for(t, r), {}, path=PATH, config=cfg)
    expected = exact_meanflow_mse(gaussian, x, z, t, r)
    torch.testing.assert_close(out.mse, expected.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-12, atol=1e-14)  # no time weight, no cosine


def test_meanflow_dde_against_jvp_on_the_gaussian(gaussian, gen):
    """DDE's target differs from the exact (JVP) one by O(ε²)·(t - r): measured here on the oracle."""
    x, z = gaussian_batch(gaussian, 256, SHAPE, gen)
    t = 0.1 + 0.85 * torch.rand(256, generator=gen, dtype=DTYPE)
    r = t * torch.rand(256, generator=gen, dtype=DTYPE) * 0.9
    exact, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(derivative="jvp"))
    gaps = []
    for epsilon in (0.02, 0.01, 0.005):
        dde, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(dde_epsilon=epsilon))
        gaps.append((dde - exact).abs().max().item())
    print(f"meanflow DDE vs JVP target on the Gaussian, max |difference| at eps 0.02/0.01/0.005: {gaps}")
    assert gaps[2] < 1e-3  # measured 1.6e-4 at the default ε = 0.005
    assert 3.5 < gaps[0] / gaps[1] < 4.5 and 3.5 < gaps[1] / gaps[2] < 4.5  # second order
    dde_loss = get_objective("meanflow").loss(gaussian, x, z, draws_for(t, r), {}, path=PATH,
                                              config=config(objective="meanflow", adaptive_weight=False))
    torch.testing.assert_close(dde_loss.loss, exact_meanflow_mse(gaussian, x, z, t, r).mean(), rtol=1e-4, atol=0)


def test_guided_tangent_moves_the_derivative_along_the_given_direction(gen):
    """guidance_tangent = "guided" (B6): DDE and JVP along (ṽ, 1, 0); with ṽ = v it is the path's own derivative."""
    net = SmoothNet(SHAPE)
    x, z = (torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = 0.2 + 0.7 * torch.rand(8, generator=gen, dtype=DTYPE)
    r = 0.5 * t
    v, other = PATH.velocity(x, z, t), torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE)
    args = (net, x, z, t, r)
    torch.testing.assert_close(dde_time_derivative(*args, path=PATH, epsilon=1e-3, tangent=v),
                               dde_time_derivative(*args, path=PATH, epsilon=1e-3), rtol=0, atol=1e-10)
    along = jvp_time_derivative(*args, path=PATH, tangent=other)
    assert (along - jvp_time_derivative(*args, path=PATH)).abs().max() > 1e-3
    torch.testing.assert_close(dde_time_derivative(*args, path=PATH, epsilon=1e-3, tangent=other), along,
                               rtol=0, atol=1e-5)


def draws_for(t, r):
    from tim_ray.transition.intervals import Intervals

    return Intervals(t=t, r=r, diffusion=r == t, consistency=torch.zeros_like(t, dtype=torch.bool))


def test_meanflow_jvp_gradient_flows_through_the_primal_only(gen):
    """jvp_loss's gradient is that of mean(u_pred - sg(u_tgt))² with u_tgt from an exact derivative."""
    net = SmoothNet(SHAPE)
    x, z = (torch.randn(6, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = 0.1 + 0.8 * torch.rand(6, generator=gen, dtype=DTYPE)
    r = t * torch.rand(6, generator=gen, dtype=DTYPE)
    cfg = config(objective="meanflow", derivative="jvp", adaptive_weight=False, time_weight="constant",
                 directional_loss=False)
    out = jvp_loss(net, x, z, t, r, {}, path=PATH, config=cfg)
    target, _ = transition_target(net, x, z, t, r, path=PATH, config=config(derivative="jvp"))
    hand = (net(PATH.interpolate(x, z, t), t, r) - target).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(out.loss, hand, rtol=1e-12, atol=0)
    for ours, theirs in zip(torch.autograd.grad(out.loss, list(net.parameters())),
                            torch.autograd.grad(hand, list(net.parameters()))):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("objective,overrides,forwards", [
    ("tim", {}, 3 + 2 * 0.5),  # the default: half the rows move
    ("tim", {"diffusion_ratio": 1.0, "consistency_ratio": 0.0}, 3.0),
    ("tim", {"diffusion_ratio": 0.5, "consistency_ratio": 0.6}, 3 + 2 * 0.6),  # consistency rows win
    ("tim", {"guidance_w_cond": 0.75}, 3 + 1 + 2),  # w_gt = 1: the null branch has weight -0.75
    ("tim", {"guidance_w_cond": 0.5, "guidance_w_gt": 0.5}, 3 + 1 + 1),  # null weight 0: no null forward
    ("flow_matching", {}, 3.0),
    ("meanflow", {"derivative": "jvp"}, 4.0),
    ("meanflow", {"diffusion_ratio": 0.75, "consistency_ratio": 0.0}, 3 + 2 * 0.25),
])
def test_compute_accounting(objective, overrides, forwards):
    assert get_objective(objective).forwards_per_row(config(objective=objective, **overrides)) == \
        pytest.approx(forwards)


@pytest.mark.parametrize("overrides,message", [
    (["transition.objective=flow_matching", "transition.diffusion_ratio=1.0"],
     "'flow_matching' does not use transition.diffusion_ratio = 1.0: remove it"),
    (["transition.objective=flow_matching", "sample.mode=diffusion", "transition.derivative=jvp",
      "model.attention=math", "transition.time_weight=constant"], "transition.derivative = 'jvp', "
                                                                   "transition.time_weight = 'constant'"),
    (["transition.objective=flow_matching"], "set sample.mode to diffusion"),
    (["transition.objective=meanflow", "transition.directional_loss=false"], "does not use"),
    (["transition.objective=meanflow", "transition.path=trigflow"], "defined on the otfm path"),
    (["transition.objective=meanflow", "transition.derivative=jvp"], "needs model.attention = 'math'"),
    (["transition.guidance_w_cond=0.5", "ema.enabled=false"], "needs ema.enabled"),
    (["model.repa_dim=16"], "set transition.repa_encoder"),
])
def test_config_refuses_what_an_objective_does_not_use(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_accepts_each_objective():
    for overrides in (["transition.objective=flow_matching", "sample.mode=diffusion"],
                      ["transition.objective=meanflow", "transition.derivative=jvp", "model.attention=math"],
                      ["transition.guidance_w_cond=0.75", "transition.guidance_tangent=guided"],
                      ["model.repa_dim=16", "transition.repa_coeff=0"]):
        load_config(None, overrides)
