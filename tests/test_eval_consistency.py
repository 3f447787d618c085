"""The consistency metric (spec §10-O5): zero for an exactly composable transition map, clearly positive for a map
that is not (a flow-matching velocity used as a jump, a randomised TiM)."""
import torch
from eval_fixtures import tiny_config
from transition_closed_forms import GaussianOTFM, GaussianTrigFlow

from tim_ray.eval.consistency import TRIPLES, composition_error
from tim_ray.models.registry import build_model
from tim_ray.transition.paths import get_path

NOISE = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_the_exact_transition_composes():
    for closed_form, path in ((GaussianOTFM, "otfm"), (GaussianTrigFlow, "trigflow")):
        exact = closed_form(torch.tensor(0.7, dtype=torch.float64), 0.5)
        scores = composition_error(exact, get_path(path), NOISE)
        assert len(scores) == 1 + len(TRIPLES)
        assert max(scores.values()) < 1e-12, (path, scores)


def test_an_instantaneous_velocity_used_as_a_jump_does_not():
    exact = GaussianOTFM(torch.tensor(0.7, dtype=torch.float64), 0.5)

    def euler(x, t, r, **cond):
        return exact.u(x, t)  # ignores r: right only as t - r -> 0

    scores = composition_error(euler, get_path("otfm"), NOISE)
    assert scores["consistency"] > 0.05 and min(scores.values()) > 1e-3


def test_a_tim_at_initialisation_composes_and_a_randomised_one_does_not():
    cfg = tiny_config("class")
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, text_dim=None).eval()
    noise, cond = NOISE[:8].float(), {"y": torch.arange(8) % 10}
    assert composition_error(model, get_path("otfm"), noise, cond)["consistency"] == 0.0  # F ≡ 0: identity jumps
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert composition_error(model, get_path("otfm"), noise, cond)["consistency"] > 1e-3
