"""(t, r) samplers (spec §3.1, oracle O9): row types, r ≤ t, exact laws by KS tests, medians, determinism."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tim_ray.config import _CHOICES, TransitionConfig
from tim_ray.transition.intervals import INTERVAL_SAMPLERS, get_interval_sampler, row_types, sample_intervals
from tim_ray.transition.paths import OTFMPath, TrigFlowPath
from transition_closed_forms import one_torch_thread  # noqa: F401 (autouse)

KS_PVALUE = 1e-3
C2I = dict(p_mean=-0.4, p_std=1.0)
T2I = dict(p_mean=0.0, p_std=1.6)


def draw(batch, path=OTFMPath(), seed=0, **overrides):
    config = dataclasses.replace(TransitionConfig(), **overrides)
    return sample_intervals(batch, path, config, torch.Generator().manual_seed(seed), dtype=torch.float64)


def logit(a):
    return np.log(a / (1 - a))


def test_registry_matches_config_choices():
    assert tuple(INTERVAL_SAMPLERS) == _CHOICES["transition.interval_sampler"]
    with pytest.raises(ValueError, match="logit_normal_pair"):
        get_interval_sampler("beta")


@pytest.mark.parametrize("batch,diffusion_ratio,consistency_ratio,n_diffusion,n_consistency", [
    (64, 0.5, 0.1, 32, 6), (10, 0.5, 0.1, 5, 1), (7, 0.5, 0.1, 4, 1), (5, 0.5, 0.1, 2, 0),  # round half to even
    (10, 0.0, 0.0, 0, 0), (10, 1.0, 0.0, 10, 0), (10, 0.0, 1.0, 0, 10),
    (10, 0.8, 0.5, 5, 5),  # overlap: the last 5 rows are consistency rows, diffusion keeps the first 5
])
def test_o9_exact_row_counts(batch, diffusion_ratio, consistency_ratio, n_diffusion, n_consistency):
    out = draw(batch, diffusion_ratio=diffusion_ratio, consistency_ratio=consistency_ratio)
    assert int(out.diffusion.sum()) == n_diffusion and int(out.consistency.sum()) == n_consistency
    assert torch.equal(out.r[out.diffusion], out.t[out.diffusion])
    assert torch.all(out.r[out.consistency] == 0.0)
    assert torch.all(out.diffusion[:n_diffusion]) and torch.all(out.consistency[batch - n_consistency:])
    assert torch.all(out.transition == ~(out.diffusion | out.consistency))
    by_value = row_types(out.t, out.r, 0.0)
    for mask, from_values in zip((out.diffusion, out.consistency, out.transition), by_value):
        assert torch.equal(mask, from_values)


@pytest.mark.parametrize("name", list(INTERVAL_SAMPLERS))
@pytest.mark.parametrize("path", [OTFMPath(), TrigFlowPath()])
def test_r_never_exceeds_t_in_float32(name, path):
    config = dataclasses.replace(TransitionConfig(), interval_sampler=name, diffusion_ratio=0.0, consistency_ratio=0.0)
    out = sample_intervals(20000, path, config, torch.Generator().manual_seed(1))
    assert out.t.dtype == torch.float32
    assert torch.all(out.r <= out.t) and torch.all(out.r >= path.t_min) and torch.all(out.t <= path.t_max)
    assert torch.all(out.transition[out.r < out.t])


@pytest.mark.parametrize("params", [C2I, T2I])
def test_o9_ks_logit_normal_pair_t_and_r(params):
    """P(t ≤ a) = Φ((logit a - P_mean)/P_std)², P(r ≤ a) = 1 - (1 - Φ(...))²."""
    out = draw(20000, diffusion_ratio=0.0, consistency_ratio=0.0, **params)
    single = lambda a: stats.norm.cdf((logit(a) - params["p_mean"]) / params["p_std"])
    assert stats.kstest(out.t.numpy(), lambda a: single(a) ** 2).pvalue > KS_PVALUE
    assert stats.kstest(out.r.numpy(), lambda a: 1 - (1 - single(a)) ** 2).pvalue > KS_PVALUE
    # The test has power: the single-draw law (no max) is rejected.
    assert stats.kstest(out.t.numpy(), single).pvalue < 1e-6


def test_o9_ks_trigflow_pair():
    """TrigFlow draws τ = atan σ: P(t ≤ a) = Φ((log tan a - P_mean)/P_std)²."""
    out = draw(20000, TrigFlowPath(), diffusion_ratio=0.0, consistency_ratio=0.0, p_mean=-1.0, p_std=1.6)
    cdf = lambda a: stats.norm.cdf((np.log(np.tan(a)) + 1.0) / 1.6) ** 2
    assert stats.kstest(out.t.numpy(), cdf).pvalue > KS_PVALUE


@pytest.mark.parametrize("params,median_t,median_r", [(C2I, 0.536, 0.280), (T2I, 0.705, 0.295)])
def test_o9_medians(params, median_t, median_r):
    """Closed-form medians (Φ(q)² = ½) match the spec's numbers, and the sample medians match them."""
    quantile = stats.norm.ppf(math.sqrt(0.5))
    exact_t = 1 / (1 + math.exp(-(params["p_mean"] + params["p_std"] * quantile)))
    exact_r = 1 / (1 + math.exp(-(params["p_mean"] - params["p_std"] * quantile)))
    assert abs(exact_t - median_t) < 5e-4 and abs(exact_r - median_r) < 5e-4
    out = draw(100000, diffusion_ratio=0.0, consistency_ratio=0.0, **params)
    assert abs(out.t.median().item() - exact_t) < 0.005 and abs(out.r.median().item() - exact_r) < 0.005


def test_c2i_mean_interval():
    out = draw(100000, diffusion_ratio=0.0, consistency_ratio=0.0, **C2I)
    assert abs((out.t - out.r).mean().item() - 0.233) < 0.003


def test_ks_uniform_pair():
    """t = max of two uniforms: P(t ≤ a) = a²; r = min: 1 - (1 - a)²."""
    out = draw(20000, interval_sampler="uniform_pair", diffusion_ratio=0.0, consistency_ratio=0.0)
    assert stats.kstest(out.t.numpy(), lambda a: a ** 2).pvalue > KS_PVALUE
    assert stats.kstest(out.r.numpy(), lambda a: 1 - (1 - a) ** 2).pvalue > KS_PVALUE


def test_ks_independent():
    """t is one logit-normal draw; the fraction (t - r)/t is logit-normal(delta_logit_mean, delta_logit_std)."""
    out = draw(20000, interval_sampler="independent", diffusion_ratio=0.0, consistency_ratio=0.0,
               p_mean=-0.4, p_std=1.0, delta_logit_mean=-1.0, delta_logit_std=0.5)
    t, r = out.t.numpy(), out.r.numpy()
    assert stats.kstest(t, lambda a: stats.norm.cdf((logit(a) + 0.4) / 1.0)).pvalue > KS_PVALUE
    assert stats.kstest((t - r) / t, lambda f: stats.norm.cdf((logit(f) + 1.0) / 0.5)).pvalue > KS_PVALUE


@pytest.mark.parametrize("name", list(INTERVAL_SAMPLERS))
def test_generator_determinism(name):
    first, again = draw(64, seed=3, interval_sampler=name), draw(64, seed=3, interval_sampler=name)
    other = draw(64, seed=4, interval_sampler=name)
    assert torch.equal(first.t, again.t) and torch.equal(first.r, again.r)
    assert not torch.equal(first.t, other.t)
