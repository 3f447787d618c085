"""Any-step sampler (spec §6): exactness with F* (O4, O4s), the Euler control, CFG (O12), NFE, determinism."""
import dataclasses

import pytest
import torch

from tim_ray.config import SampleConfig
from tim_ray.transition.paths import OTFMPath, TrigFlowPath
from tim_ray.transition.sampler import cfg_active, sample, sample_from_config, time_grid
from transition_closed_forms import DTYPE, SHAPE, GaussianOTFM, GaussianTrigFlow
from transition_closed_forms import one_torch_thread  # noqa: F401 (autouse)

MU = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
S = 0.7


def noise(n, seed=1, shape=SHAPE):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


class Recorder:
    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, r, **cond):
        self.calls.append(dict(batch=len(x), t=t[0].item(), r=r[0].item()))
        return self.model(x, t, r, **cond)


def test_time_grid_ends_exactly():
    for path in (OTFMPath(), TrigFlowPath()):
        grid = time_grid(path, 7)
        assert grid[0].item() == path.t_max and grid[-1].item() == path.t_min and len(grid) == 8


@pytest.mark.parametrize("steps", [1, 2, 4, 128])
def test_o4_transition_sampler_is_exact_for_any_step_count(steps):
    z = noise(2000)
    out = sample(GaussianOTFM(MU, S), z, path=OTFMPath(), steps=steps, model_dtype=DTYPE)
    assert (out.x - (MU + S * z)).abs().max() < 1e-12 * steps + 1e-13
    assert out.nfe == steps and out.forward_calls == steps and out.x.dtype == torch.float64


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_o4_trigflow_sampler_is_exact(steps):
    z = noise(500)
    out = sample(GaussianTrigFlow(MU, S), z, path=TrigFlowPath(), steps=steps, model_dtype=DTYPE)
    assert (out.x - (MU + S * z)).abs().max() < 1e-11


def test_o4_float32_model_inputs_keep_float64_state_close():
    z = noise(500)
    out = sample(GaussianOTFM(MU.float(), S), z, path=OTFMPath(), steps=8)
    assert out.x.dtype == torch.float64 and (out.x - (MU + S * z)).abs().max() < 1e-5 * 8


def euler_gain(steps):
    """The per-sample std that Euler on u (diffusion mode) gives: the sampler is affine in z, so feed z = 1, 0."""
    ones, zeros = torch.ones(1, *SHAPE, dtype=DTYPE), torch.zeros(1, *SHAPE, dtype=DTYPE)
    run = lambda z: sample(GaussianOTFM(MU, S), z, path=OTFMPath(), steps=steps, mode="diffusion",
                           model_dtype=DTYPE).x
    return (run(ones) - run(zeros)).mean().item()


def test_o4_negative_control_euler_collapses_at_one_step():
    z = noise(1000)
    out = sample(GaussianOTFM(MU, S), z, path=OTFMPath(), steps=1, mode="diffusion", model_dtype=DTYPE)
    assert (out.x - MU).abs().max() < 1e-12


@pytest.mark.parametrize("steps,std", [(4, 0.499), (16, 0.644), (128, 0.692)])
def test_o4_diffusion_mode_converges_slowly(steps, std):
    """'diffusion' mode works (spec B4): its std is Π_k (1 - Δ·S'_t/S_t) over the grid, exactly, near the spec's
    Monte-Carlo values (N = 4, 16, 128), and only approaches s = 0.7 as N grows."""
    gaussian, grid = GaussianOTFM(MU, S), torch.linspace(1, 0, steps + 1, dtype=DTYPE)
    exact = torch.prod(1 - (grid[:-1] - grid[1:]) * gaussian.dS(grid[:-1]) / gaussian.S(grid[:-1])).item()
    assert abs(euler_gain(steps) - exact) < 1e-12 and abs(exact - std) < 5e-3


def test_diffusion_mode_queries_r_equal_t():
    model = Recorder(GaussianOTFM(MU, S))
    sample(model, noise(4), path=OTFMPath(), steps=4, mode="diffusion", model_dtype=DTYPE)
    assert [(call["t"], call["r"]) for call in model.calls] == [(1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (0.25, 0.25)]


def stochastic_moments(steps, n=20_000, seed=2):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=gen, dtype=DTYPE)
    mu = torch.linspace(-1, 1, 5, dtype=DTYPE)
    out = sample(GaussianOTFM(mu, S), z, path=OTFMPath(), steps=steps, stochasticity=0.2, generator=gen,
                 model_dtype=DTYPE)
    return (out.x.std(0).mean() - S).abs().item(), (out.x.mean(0) - mu).abs().max().item()


def test_o4s_stochastic_sampler_keeps_the_marginal():
    (std_error, mean_error), coarse_std_error = stochastic_moments(256), stochastic_moments(8)[0]
    assert std_error < 0.01 and mean_error < 0.02
    assert coarse_std_error > 0.012  # the bias shrinks with N: at 8 steps the std is visibly off (~0.72)


def test_stochastic_steps_skip_the_first_and_last_step():
    """With 2 steps there is no inner step: the sampler stays exact and draws nothing."""
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    z = noise(100)
    out = sample(GaussianOTFM(MU, S), z, path=OTFMPath(), steps=2, stochasticity=0.5, generator=gen,
                 model_dtype=DTYPE)
    assert (out.x - (MU + S * z)).abs().max() < 1e-12 and torch.equal(gen.get_state(), state)


def test_determinism_for_a_generator_seed():
    run = lambda seed: sample(GaussianOTFM(MU, S), noise(16), path=OTFMPath(), steps=6, stochasticity=0.3,
                              generator=torch.Generator().manual_seed(seed), model_dtype=DTYPE).x
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_trigflow_refuses_stochasticity():
    with pytest.raises(ValueError, match="trigflow"):
        sample(GaussianTrigFlow(MU, S), noise(2), path=TrigFlowPath(), steps=3, stochasticity=0.2)


def labelled(x, t, r, y):
    """F depends on the label: F = y·1 + 0.5·x, so one step from T_max = 1 gives x - F."""
    return y.to(x.dtype).reshape(-1, 1, 1, 1) + 0.5 * x


def test_o12_scale_one_is_one_forward_returning_the_cond_prediction():
    z, y, null = noise(4), dict(y=torch.arange(4)), dict(y=torch.full((4,), 9))
    model = Recorder(labelled)
    out = sample(model, z, y, null, path=OTFMPath(), steps=3, cfg_scale=1.0, model_dtype=DTYPE)
    expected = sample(labelled, z, y, path=OTFMPath(), steps=3, model_dtype=DTYPE).x
    assert torch.equal(out.x, expected) and out.nfe == 3 and [c["batch"] for c in model.calls] == [4, 4, 4]


def test_o12_guided_prediction_is_one_batched_forward():
    z, y, null = noise(4), dict(y=torch.arange(4)), dict(y=torch.full((4,), 9))
    model = Recorder(labelled)
    out = sample(model, z, y, null, path=OTFMPath(), steps=1, cfg_scale=3.0, model_dtype=DTYPE)
    F_cond, F_uncond = labelled(z, None, None, y["y"]), labelled(z, None, None, null["y"])
    torch.testing.assert_close(out.x, z - (F_uncond + 3.0 * (F_cond - F_uncond)), rtol=0, atol=1e-14)
    assert out.nfe == 2 and out.forward_calls == 1 and model.calls[0]["batch"] == 8


def test_o12_first_step_guidance_flag():
    """guide_first_step=False is the official strict interval: a 1-step sample is never guided (spec B3)."""
    z, y, null = noise(4), dict(y=torch.arange(4)), dict(y=torch.full((4,), 9))
    strict = sample(labelled, z, y, null, path=OTFMPath(), steps=1, cfg_scale=3.0, guide_first_step=False,
                    model_dtype=DTYPE)
    assert strict.nfe == 1 and torch.equal(strict.x, z - labelled(z, None, None, y["y"]))
    assert cfg_active(1.0, 1.0, 3.0, (0.0, 1.0), guide_first_step=True)
    assert not cfg_active(1.0, 1.0, 3.0, (0.0, 1.0), guide_first_step=False)
    assert not cfg_active(0.5, 1.0, 1.0, (0.0, 1.0), guide_first_step=True)


def test_o12_nfe_counts_guided_steps_twice():
    """10 steps, interval [0, 0.6]: guided at t = 0.6 (closed upper end) ... 0.1, i.e. 6 steps → NFE 16."""
    model = Recorder(labelled)
    y, null = dict(y=torch.arange(2)), dict(y=torch.full((2,), 9))
    out = sample(model, noise(2), y, null, path=OTFMPath(), steps=10, cfg_scale=2.5, cfg_interval=(0.0, 0.6),
                 model_dtype=DTYPE)
    assert [c["batch"] for c in model.calls] == [2] * 4 + [4] * 6 and out.nfe == 16 and out.forward_calls == 10
    strict = sample(labelled, noise(2), y, null, path=OTFMPath(), steps=10, cfg_scale=2.5, cfg_interval=(0.0, 0.6),
                    guide_first_step=False, model_dtype=DTYPE)
    assert strict.nfe == 15


def test_guidance_needs_matching_conditions():
    with pytest.raises(ValueError, match="uncond"):
        sample(labelled, noise(2), dict(y=torch.arange(2)), path=OTFMPath(), steps=1, cfg_scale=2.0, model_dtype=DTYPE)
    with pytest.raises(ValueError, match="same keys"):
        sample(labelled, noise(2), dict(y=torch.arange(2)), dict(label=torch.arange(2)), path=OTFMPath(), steps=1,
               cfg_scale=2.0, model_dtype=DTYPE)


def test_sample_from_config():
    config = dataclasses.replace(SampleConfig(), nfe=4, cfg_scale=1.0, mode="transition")
    z = noise(50)
    out = sample_from_config(GaussianOTFM(MU, S), z, None, None, path=OTFMPath(), config=config, model_dtype=DTYPE)
    assert out.nfe == 4 and (out.x - (MU + S * z)).abs().max() < 1e-12
    assert sample_from_config(GaussianOTFM(MU, S), z, None, None, path=OTFMPath(), config=config, steps=2,
                              model_dtype=DTYPE).nfe == 2
