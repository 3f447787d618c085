"""dF/dt by DDE and JVP (spec §3.4, oracle O6, bugs B2 and B8)."""

import dataclasses

import numpy as np
import pytest
import torch

from tim_ray.config import ModelConfig
from tim_ray.models.registry import build_model
from tim_ray.transition.objective import dde_time_derivative, jvp_time_derivative
from tim_ray.transition.paths import OTFMPath, TrigFlowPath
from transition_closed_forms import one_torch_thread  # noqa: F401 (autouse)
from transition_closed_forms import DTYPE, SHAPE, GaussianOTFM, SmoothNet, TinyAttentionNet, gaussian_batch

EPSILONS = [0.02, 0.01, 0.005, 0.0025]
# torch's forward-AD decompositions script themselves on first use; the warning is torch's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class Recorder:
    """Wraps a model and records the batch size and the (t, r) of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, r, **cond):
        self.calls.append(dict(batch=len(x), t=t.clone(), r=r.clone(), cond=cond))
        return self.model(x, t, r, **cond)


def batch(n=6, seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    x, z = (torch.randn(n, *shape, generator=gen, dtype=DTYPE) for _ in range(2))
    t = 0.3 + 0.4 * torch.rand(n, generator=gen, dtype=DTYPE)  # central stencil fits: t ± 0.02 inside (r, 1)
    r = (t - 0.05) * torch.rand(n, generator=gen, dtype=DTYPE)
    r[0] = t[0]  # one diffusion row
    return x, z, t, r


def observed_orders(model, path, x, z, t, r):
    exact = jvp_time_derivative(model, x, z, t, r, path=path)
    errors = [(dde_time_derivative(model, x, z, t, r, path=path, epsilon=e) - exact).abs().max().item()
              for e in EPSILONS]
    return np.log2(np.array(errors[:-1]) / np.array(errors[1:])), errors


@pytest.mark.parametrize("path", [OTFMPath(), TrigFlowPath()])
@pytest.mark.parametrize("net", [SmoothNet(SHAPE), TinyAttentionNet(SHAPE[0])], ids=["mlp", "attention"])
def test_o6_dde_matches_jvp_at_order_two(net, path):
    orders, errors = observed_orders(net, path, *batch())
    assert np.all(np.abs(orders - 2) < 0.15), (orders, errors)
    assert errors[2] < 1e-3


def test_o6c_dde_matches_jvp_on_a_tiny_tim():
    """The real network (tim-tiny, math attention, float64, weights jittered off the zero init so F ≠ 0)."""
    config = dataclasses.replace(ModelConfig(), arch="tim-tiny", conditioning="class", attention="math", num_classes=4)
    torch.manual_seed(0)
    tim = build_model(config, in_channels=3, text_dim=None, dtype=DTYPE)
    with torch.no_grad():
        for parameter in tim.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, z, t, r = batch(4, shape=(3, 8, 8))
    labels = dict(y=torch.tensor([0, 1, 2, 3]))
    exact = jvp_time_derivative(tim, x, z, t, r, labels, path=OTFMPath())
    errors = [(dde_time_derivative(tim, x, z, t, r, labels, path=OTFMPath(), epsilon=e) - exact).abs().max().item()
              for e in EPSILONS]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert exact.abs().max() > 0.1 and np.all(np.abs(orders - 2) < 0.15), (orders, errors)


def test_o6_jvp_is_exact_on_the_gaussian_transition():
    """The JVP of F* along (v, 1, 0) equals the closed-form total derivative; rows with r = t stay 0."""
    gen = torch.Generator().manual_seed(1)
    gaussian = GaussianOTFM(torch.randn(SHAPE, generator=gen, dtype=DTYPE), 0.7)
    x, z = gaussian_batch(gaussian, 64, SHAPE, gen)
    t = 0.05 + 0.94 * torch.rand(64, generator=gen, dtype=DTYPE)
    r = (t - 1e-3) * torch.rand(64, generator=gen, dtype=DTYPE)
    r[:5] = t[:5]
    path = OTFMPath()
    x_t, v = path.interpolate(x, z, t), path.velocity(x, z, t)
    got = jvp_time_derivative(gaussian, x, z, t, r, path=path)
    assert torch.all(got[:5] == 0)
    assert (got[5:] - gaussian.dF_dt(x_t[5:], t[5:], r[5:], v[5:])).abs().max() < 1e-11


def test_o6d_tangent_convention():
    """r is held fixed and t moves: F = g(r) has dF/dt = 0, F = g(t - r) has dF/dt = g'(t - r)."""
    x, z, t, r = batch()
    path, moving = OTFMPath(), r != t
    of_r = lambda x_, t_, r_: torch.sin(3 * r_)[:, None, None, None] * torch.ones_like(x_)
    of_gap = lambda x_, t_, r_: torch.sin(3 * (t_ - r_))[:, None, None, None] * torch.ones_like(x_)
    slope = (3 * torch.cos(3 * (t - r)))[:, None, None, None].expand_as(x)
    for derivative in (jvp_time_derivative(of_r, x, z, t, r, path=path),
                       dde_time_derivative(of_r, x, z, t, r, path=path, epsilon=0.005)):
        assert derivative.abs().max() < 1e-12
    assert (jvp_time_derivative(of_gap, x, z, t, r, path=path)[moving] - slope[moving]).abs().max() < 1e-12
    dde = dde_time_derivative(of_gap, x, z, t, r, path=path, epsilon=0.005)
    assert (dde[moving] - slope[moving]).abs().max() < 1.01 * 0.005 ** 2 / 6 * 27  # ε²/6·max|g'''|
    assert torch.all(dde[~moving] == 0)


def test_dde_calls_the_given_model_twice_on_moving_rows_only():
    x, z, t, r = batch()
    context = torch.arange(6.0, dtype=DTYPE)[:, None].expand(6, 4).clone()
    cond = dict(context=context, scale=2.0)
    model = Recorder(lambda x_, t_, r_, context, scale: x_ * context.sum(1)[:, None, None, None] * scale)
    dde_time_derivative(model, x, z, t, r, cond, path=OTFMPath(), epsilon=0.005)
    assert [call["batch"] for call in model.calls] == [5, 5]
    for call in model.calls:
        assert torch.equal(call["cond"]["context"], context[1:]) and call["cond"]["scale"] == 2.0
        assert torch.equal(call["r"], r[1:])
    assert torch.allclose(model.calls[0]["t"], t[1:] + 0.005) and torch.allclose(model.calls[1]["t"], t[1:] - 0.005)
    assert cond["context"] is context and context.shape == (6, 4)  # the caller's dict is not sliced in place


def test_no_derivative_forward_when_every_row_has_r_equal_t():
    x, z, t, _ = batch()
    model = Recorder(SmoothNet(SHAPE))
    assert torch.all(dde_time_derivative(model, x, z, t, t, path=OTFMPath(), epsilon=0.005) == 0)
    assert torch.all(jvp_time_derivative(model, x, z, t, t, path=OTFMPath()) == 0)
    assert model.calls == []


def test_b8_stencil_never_crosses_r_or_t_max():
    """Rows with t - r < ε: the lower point stops at r; rows with t + ε > T_max: the upper point stops at T_max.
    For F = g(t - r) the quotient is then exactly [g(t_hi - r) - g(t_lo - r)]/(t_hi - t_lo)."""
    x, z, _, _ = batch(4)
    eps = 0.005
    t = torch.tensor([0.5, 0.5, 0.998, 1.0], dtype=DTYPE)
    r = torch.tensor([0.499, 0.4, 0.997, 0.3], dtype=DTYPE)
    g = lambda gap: torch.sin(3 * gap) + gap ** 2
    model = Recorder(lambda x_, t_, r_: g(t_ - r_)[:, None, None, None] * torch.ones_like(x_))
    got = dde_time_derivative(model, x, z, t, r, path=OTFMPath(), epsilon=eps)[:, 0, 0, 0]
    for call in model.calls:
        assert torch.all(call["t"] >= call["r"]) and torch.all(call["t"] <= 1.0)
    t_hi = torch.tensor([0.505, 0.505, 1.0, 1.0], dtype=DTYPE)
    t_lo = torch.tensor([0.499, 0.495, 0.997, 0.995], dtype=DTYPE)
    expected = (g(t_hi - r) - g(t_lo - r)) / (t_hi - t_lo)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    exact = 3 * torch.cos(3 * (t - r)) + 2 * (t - r)
    assert (got - exact).abs().max() < 0.05  # first order there, still a sound slope


def test_b8_clamped_rows_converge_at_first_order():
    net, path = SmoothNet(SHAPE), OTFMPath()
    x, z, _, _ = batch(4)
    t = torch.full((4,), 0.5, dtype=DTYPE)
    r = t - 0.001  # t - r < ε for every ε tried
    exact = jvp_time_derivative(net, x, z, t, r, path=path)
    errors = [(dde_time_derivative(net, x, z, t, r, path=path, epsilon=e) - exact).abs().max().item()
              for e in (0.04, 0.02, 0.01)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 0.7), (orders, errors)


def test_b2_difference_is_taken_in_float32_for_bf16_outputs():
    """With bf16 network outputs, the quotient is (F_hi - F_lo)/(2ε) of the bf16 values, computed in float32.
    Scaling by 1/(2ε) in bf16 first (the official order) loses about 2⁻⁸·|F|/(2ε)."""
    x = torch.zeros(2, 1, 1, 1)
    z = torch.ones(2, 1, 1, 1)
    t, r, eps = torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2]), 0.005
    bf16_model = lambda x_, t_, r_: (3.0 + 0.37 * x_ + 0.11 * t_[:, None, None, None]).to(torch.bfloat16)
    got = dde_time_derivative(bf16_model, x, z, t, r, path=OTFMPath(), epsilon=eps)
    assert got.dtype == torch.float32
    on_path = lambda s: s[:, None, None, None] * z  # x_s = (1 - s)·0 + s·1
    hi, lo = bf16_model(on_path(t + eps), t + eps, r), bf16_model(on_path(t - eps), t - eps, r)
    exact_of_bf16 = (hi.double() - lo.double()) / (2 * eps)
    torch.testing.assert_close(got.double(), exact_of_bf16, rtol=1e-5, atol=0)
    scaled_first = (hi * (1 / (2 * eps)) - lo * (1 / (2 * eps))).double()
    assert (scaled_first - exact_of_bf16).abs().max() > 0.1  # the check above can tell the two orders apart


def test_b2_fp32_forwards_remove_the_bf16_rounding():
    """Under bf16 autocast the DDE error is dominated by bf16 outputs; fp32_forwards brings it to the fp32 level."""
    x, z, t, r = (v.float() for v in batch(16))
    net = SmoothNet(SHAPE, hidden=64).float()
    reference = jvp_time_derivative(net.double(), x.double(), z.double(), t.double(), r.double(), path=OTFMPath())
    net.float()
    error = lambda d: (d.double() - reference).abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dde_time_derivative(net, x, z, t, r, path=OTFMPath(), epsilon=0.005)
        full = dde_time_derivative(net, x, z, t, r, path=OTFMPath(), epsilon=0.005, fp32_forwards=True)
    plain = dde_time_derivative(net, x, z, t, r, path=OTFMPath(), epsilon=0.005)
    assert mixed.dtype == torch.float32 and error(full) == error(plain) and error(full) < 1e-3 < 1e-2 < error(mixed)
