"""The training objective (spec §3.5-3.8): oracles O2, O3, O10, O11, the REPA term and the loss assembly."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as nnf

from tim_ray.config import TransitionConfig
from tim_ray.transition.objective import (ModelGuidance, adaptive_weight, time_weight, transition_loss,
                                          transition_target)
from tim_ray.transition.paths import OTFMPath
from transition_closed_forms import DTYPE, SHAPE, GaussianOTFM, gaussian_batch
from transition_closed_forms import gaussian, gen, one_torch_thread  # noqa: F401 (fixtures)
from transition_closed_forms import per_sample as broadcast

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
PATH = OTFMPath()


def config(**overrides):
    return dataclasses.replace(TransitionConfig(), **overrides)


class Recorder:
    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, r, **kwargs):
        self.calls.append(dict(batch=len(x), t=t.clone(), r=r.clone(), kwargs=kwargs))
        return self.model(x, t, r, **kwargs)


class AffineNet(torch.nn.Module):
    """F = θ ⊙ x_t + β·t (θ per channel): dF/dt along (v, 1, 0) is θ ⊙ v + β, and DDE is exact on it."""

    def __init__(self, channels=SHAPE[0]):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels, dtype=DTYPE)[:, None, None])
        self.beta = torch.nn.Parameter(torch.tensor(0.3, dtype=DTYPE))

    def forward(self, x, t, r, **cond):
        return self.theta * x + self.beta * broadcast(t, x)


def times(n, gen, n_diffusion=0, n_consistency=0):
    t = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=DTYPE)
    r = (t - 0.01) * torch.rand(n, generator=gen, dtype=DTYPE)
    r[:n_diffusion] = t[:n_diffusion]
    r[n - n_consistency:] = 0.0
    return t, r


def test_o2_conditional_target_residual(gaussian, gen):
    """F_tgt - F* = (S_r/S_t)(v - u) exactly with the JVP, and to O(ε²) with the DDE."""
    x, z = gaussian_batch(gaussian, 200, SHAPE, gen)
    t, r = times(200, gen)
    x_t, v = PATH.interpolate(x, z, t), PATH.velocity(x, z, t)
    expected = broadcast(gaussian.S(r) / gaussian.S(t), x) * (v - gaussian.u(x_t, t))
    exact, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(derivative="jvp"))
    assert (exact - gaussian(x_t, t, r) - expected).abs().max() < 1e-12
    dde, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(derivative="dde"))
    assert (dde - gaussian(x_t, t, r) - expected).abs().max() < 1e-3


def test_o2b_degenerate_data_target_equals_prediction(gen):
    gaussian = GaussianOTFM(torch.randn(SHAPE, generator=gen, dtype=DTYPE), 0.0)
    x, z = gaussian_batch(gaussian, 50, SHAPE, gen)
    t, r = times(50, gen)
    target, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(derivative="jvp"))
    assert (target - gaussian(PATH.interpolate(x, z, t), t, r)).abs().max() < 1e-12


def test_o2c_optimum_is_stationary(gaussian, gen):
    """E[(F_tgt - F*)·g(x_t)] = 0 for g = tanh, at t = 0.8, r = 0.3 (|mean|/se < 4.5)."""
    n = 100_000
    x, z = gaussian_batch(gaussian, n, SHAPE, gen)
    t, r = torch.full((n,), 0.8, dtype=DTYPE), torch.full((n,), 0.3, dtype=DTYPE)
    target, _ = transition_target(gaussian, x, z, t, r, path=PATH, config=config(derivative="jvp"))
    x_t = PATH.interpolate(x, z, t)
    product = (target - gaussian(x_t, t, r)) * torch.tanh(x_t)
    assert (product.mean(0) / (product.std(0) / math.sqrt(n))).abs().max() < 4.5


def test_o2d_mse_floor_of_the_exact_minimiser(gaussian, gen):
    """With the exact F* (default DDE config) the raw MSE stays at (S_r/S_t)²[1 + s² - (t-(1-t)s²)²/S_t²]."""
    n = 40_000
    x, z = gaussian_batch(gaussian, n, SHAPE, gen)
    t, r = torch.full((n,), 0.8, dtype=DTYPE), torch.full((n,), 0.3, dtype=DTYPE)
    out = transition_loss(gaussian, x, z, t, r, path=PATH, config=config())
    floor = gaussian.mse_floor(0.8, 0.3)
    assert abs(floor - 0.3718) < 1e-4
    assert abs(out.mse.item() - floor) < 0.006  # ~5 standard errors at 4.8e5 squared residuals


def test_o3_r_equals_t_is_flow_matching_with_one_forward(gen):
    x, z = (torch.randn(8, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = torch.rand(8, generator=gen, dtype=DTYPE)
    model = Recorder(AffineNet())
    target, derivative = transition_target(model, x, z, t, t, path=PATH, config=config())
    assert torch.equal(target, z - x) and torch.all(derivative == 0) and model.calls == []
    out = transition_loss(model, x, z, t, t, path=PATH, config=config())
    assert len(model.calls) == 1
    F_pred = model.model(PATH.interpolate(x, z, t), t, t)
    per_sample = ((F_pred - (z - x)) ** 2).flatten(1).mean(1) \
        + (1 - nnf.cosine_similarity(F_pred, z - x, dim=1)).flatten(1).mean(1)
    torch.testing.assert_close(out.loss, (per_sample / (per_sample.detach() + 1e-5)).mean())
    assert out.mean_weight.item() == 1.0 and math.isnan(out.transition.item()) and math.isnan(out.consistency.item())


def test_o10_weight_values():
    t, r = torch.tensor([0.8, 1.0, 0.6], dtype=DTYPE), torch.tensor([0.3, 0.0, 0.6], dtype=DTYPE)
    w = time_weight(t, r, kind="sqrt", time_map="tangent", weight_t_and_r=True, sigma_d=1.0)
    torch.testing.assert_close(w, torch.tensor([0.762426, 0.625317, 1.0], dtype=DTYPE), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,formula", [
    ("constant", lambda d, s: 1.0), ("reciprocal", lambda d, s: 1 / (d + s)), ("sqrt", lambda d, s: (d + s) ** -0.5),
    ("square", lambda d, s: (d + s) ** -2), ("soft_min_snr", lambda d, s: 1 / (d * d + s * s)),
])
@pytest.mark.parametrize("time_map,mapping", [
    ("tangent", math.tan), ("sigmoid", lambda a: a / (1 - a)), ("none", lambda a: a),
])
@pytest.mark.parametrize("weight_t_and_r", [True, False])
def test_o10_weight_variants(kind, formula, time_map, mapping, weight_t_and_r):
    pairs = [(0.7, 0.2), (0.4, 0.0), (0.9, 0.85), (0.5, 0.5)]
    t, r = (torch.tensor(column, dtype=DTYPE) for column in zip(*pairs))
    got = time_weight(t, r, kind=kind, time_map=time_map, weight_t_and_r=weight_t_and_r, sigma_d=0.5)
    for value, (tt, rr) in zip(got.tolist(), pairs):
        delta = mapping(tt) - mapping(rr) if weight_t_and_r else mapping(tt)
        assert value == pytest.approx(1.0 if tt == rr else formula(delta, 0.5), rel=1e-12)


def test_o10_adaptive_weight_gradient():
    """∇[L/sg(L + c)] = ∇L/(L + c)."""
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=DTYPE, requires_grad=True)
    loss = (theta ** 2).sum() + torch.sin(theta).sum()
    (grad,) = torch.autograd.grad(adaptive_weight(loss) * loss, theta)
    torch.testing.assert_close(grad, (2 * theta + torch.cos(theta)).detach() / (loss.detach() + 1e-5))


def hand_loss(net, x, z, t, r, directional=True, adaptive=True):
    """The objective written out for AffineNet: F_tgt = v - (t-r)(θ v + β), w = (1 + tan t - tan r)^-½."""
    x_t, v = (1 - broadcast(t, x)) * x + broadcast(t, x) * z, z - x
    target = (v - broadcast(t - r, x) * (net.theta * v + net.beta)).detach()
    F_pred = net(x_t, t, r)
    per_sample = ((F_pred - target) ** 2).flatten(1).mean(1)
    if directional:
        per_sample = per_sample + (1 - nnf.cosine_similarity(F_pred, target, dim=1)).flatten(1).mean(1)
    weight = torch.where(t == r, 1.0, (1 + torch.tan(t) - torch.tan(r)) ** -0.5)
    scale = 1 / (per_sample.detach() + 1e-5) if adaptive else 1.0
    return (weight * scale * per_sample).mean(), per_sample.detach(), weight


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
@pytest.mark.parametrize("directional,adaptive", [(True, True), (False, False)])
def test_loss_value_gradient_and_parts(derivative, directional, adaptive, gen):
    x, z = (torch.randn(10, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t, r = times(10, gen, n_diffusion=5, n_consistency=1)
    ours, theirs = AffineNet(), AffineNet()
    cfg = config(derivative=derivative, directional_loss=directional, adaptive_weight=adaptive)
    out = transition_loss(ours, x, z, t, r, path=PATH, config=cfg)
    expected, per_sample, weight = hand_loss(theirs, x, z, t, r, directional, adaptive)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for ours_grad, theirs_grad in zip(torch.autograd.grad(out.loss, list(ours.parameters())),
                                      torch.autograd.grad(expected, list(theirs.parameters()))):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.diffusion, per_sample[:5].mean())
    torch.testing.assert_close(out.transition, per_sample[5:9].mean())
    torch.testing.assert_close(out.consistency, per_sample[9])
    torch.testing.assert_close(out.mean_weight, weight.mean())
    assert out.repa.item() == 0.0 and not out.mse.requires_grad
    assert set(out.metrics()) >= {"loss", "mse", "directional", "diffusion", "transition", "consistency", "repa"}


def test_repa_term(gen):
    x, z = (torch.randn(4, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t, r = times(4, gen)
    h_target = torch.randn(4, 6, 5, generator=gen, dtype=DTYPE)
    h_proj = torch.randn(4, 6, 5, generator=gen, dtype=DTYPE, requires_grad=True)
    net = AffineNet()

    def model(x_t, t_, r_, return_repa=False):
        return (net(x_t, t_, r_), h_proj) if return_repa else net(x_t, t_, r_)

    recorded = Recorder(model)
    plain = transition_loss(recorded, x, z, t, r, path=PATH, config=config())
    assert all("return_repa" not in call["kwargs"] for call in recorded.calls)  # no target: REPA skipped
    out = transition_loss(model, x, z, t, r, path=PATH, config=config(repa_coeff=0.5), repa_target=h_target)
    cosines = (h_proj * h_target).sum(-1) / (h_proj.norm(dim=-1) * h_target.norm(dim=-1))
    torch.testing.assert_close(out.repa, (1 - cosines).mean().detach())
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * (1 - cosines).mean())
    (grad,) = torch.autograd.grad(out.loss, h_proj)
    torch.testing.assert_close(grad, torch.autograd.grad(0.5 * (1 - cosines).mean(), h_proj)[0])


def ema_model(x, t, r, y):
    """F_ema(x, t, r | y): depends on the label, on t and on x; r must equal t."""
    assert torch.equal(t, r)
    return broadcast(y.to(x.dtype), x) + broadcast(t, x) * x


def test_o11_enhanced_target(gen):
    x, z = (torch.randn(6, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t = torch.tensor([0.2, 0.3, 0.5, 0.8, 0.9, 0.55], dtype=DTYPE)
    r = torch.tensor([0.1, 0.3, 0.0, 0.4, 0.2, 0.5], dtype=DTYPE)
    y, y_null = torch.arange(6), torch.full((6,), 10)
    guidance = ModelGuidance(model=Recorder(ema_model), cond=dict(y=y), uncond=dict(y=y_null))
    net = AffineNet()
    plain, _ = transition_target(net, x, z, t, r, path=PATH, config=config())
    assert torch.equal(transition_target(net, x, z, t, r, path=PATH, config=config(), guidance=guidance)[0], plain)
    assert guidance.model.calls == []  # w_cond = 0: off, the EMA is never called
    mg = config(guidance_w_gt=1.0, guidance_w_cond=0.75, guidance_window=[0.3, 0.8])
    enhanced, _ = transition_target(net, x, z, t, r, path=PATH, config=mg, guidance=guidance)
    inside = (t >= 0.3) & (t <= 0.8)  # the window reads t only: rows 1, 2, 3 and 5
    x_t = PATH.interpolate(x, z, t)
    shift = 0.75 * (ema_model(x_t, t, t, y) - ema_model(x_t, t, t, y_null))  # dF/dt keeps the unguided tangent (B6)
    torch.testing.assert_close(enhanced[inside], (plain + shift)[inside])
    torch.testing.assert_close(enhanced[~inside], plain[~inside])
    assert [call["batch"] for call in guidance.model.calls] == [6, 6]  # whole batch: same calls on every rank
    same = ModelGuidance(model=ema_model, cond=dict(y=y), uncond=dict(y=y))
    torch.testing.assert_close(transition_target(net, x, z, t, r, path=PATH, config=mg, guidance=same)[0], plain)
    with pytest.raises(ValueError, match="ModelGuidance"):
        transition_target(net, x, z, t, r, path=PATH, config=mg)


def test_non_finite_outputs_reach_the_loss(gen):
    """No NaN masking (unlike the official code): the training loop must see a NaN to stop on it."""
    x, z = (torch.randn(4, *SHAPE, generator=gen, dtype=DTYPE) for _ in range(2))
    t, r = times(4, gen)
    out = transition_loss(lambda x_t, t_, r_: x_t * float("nan"), x, z, t, r, path=PATH, config=config())
    assert math.isnan(out.loss.item())


def test_directional_term_is_zero_for_one_channel_and_the_gradient_stays_bounded():
    """One channel: cos of scalars is sign·sign, whose gradient blows up as F_pred -> 0 (B12). With two channels
    the term is the mean of 1 - cos over positions, as the closed form of orthogonal/opposite vectors gives."""
    from tim_ray.transition.objective import per_sample_losses

    F_pred = torch.full((2, 1, 4, 4), 1e-7, requires_grad=True)
    F_tgt = -torch.ones(2, 1, 4, 4)
    mse, directional = per_sample_losses(F_pred, F_tgt)
    assert torch.equal(directional, torch.zeros(2))
    (mse + directional).sum().backward()
    assert F_pred.grad.abs().max() < 1.0

    a = torch.zeros(1, 2, 1, 2)
    a[0, 0] = 1.0  # (1, 0) at both positions
    b = torch.zeros(1, 2, 1, 2)
    b[0, 1, 0, 0], b[0, 0, 0, 1] = 1.0, -1.0  # orthogonal at the first position, opposite at the second
    assert torch.allclose(per_sample_losses(a, b)[1], torch.tensor([(1.0 + 2.0) / 2]))
