"""Each objective, model guidance and REPA through the training step (plain torch, tiny configs)."""
import pytest
import torch

from tim_ray.models.registry import build_model
from tim_ray.train.ema import EMAModel, ShardLocalEMA
from tim_ray.train.step import RepaTargets, build_optimizer, step_generator, train_step
from tim_ray.transition.paths import get_path
from test_train_step import fixed_batch, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def one_step(cfg, batch=None, ema_shift=0.0, **extras):
    """Params after one step from the seed-0 init; the EMA starts as a copy, moved by `ema_shift` if given."""
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, text_dim=None)
    optimizer = build_optimizer(model, cfg, cfg.optim.lr)
    ema = ShardLocalEMA(model, cfg.ema.decay)
    for value in ema.params.values():
        value.add_(ema_shift)
    result = train_step(model, optimizer, batch or fixed_batch(), cfg, get_path("otfm"), step_generator(0, 0, 0),
                        ema=ema, **extras)
    assert not result.skipped
    return [p.detach().clone() for p in model.parameters()], result


@pytest.mark.parametrize("overrides", [["transition.objective=flow_matching", "sample.mode=diffusion"],
                                       ["transition.objective=meanflow"],
                                       ["transition.objective=meanflow", "transition.derivative=jvp",
                                        "model.attention=math"]])
def test_every_objective_trains_a_step(overrides):
    _, result = one_step(tiny_config(*overrides))
    assert result.metrics["loss"] > 0 and result.grad_norm > 0


def test_guidance_with_w_gt_one_and_an_unconditional_ema_is_the_plain_target(monkeypatch):
    """ṽ = v + w_cond·(F_c - F_u): at init the output layer is zero, so the EMA's F_c = F_u = 0 and the step is
    bit-identical to the unguided one, while both EMA branches ran (w_gt = 1 leaves the null weight -w_cond)."""
    calls = []
    original = EMAModel.__call__
    monkeypatch.setattr(EMAModel, "__call__", lambda self, *a, **k: calls.append(k["y"]) or original(self, *a, **k))
    plain, _ = one_step(tiny_config())
    guided, _ = one_step(tiny_config("transition.guidance_w_cond=0.75"))
    assert all(torch.equal(a, b) for a, b in zip(plain, guided))
    labels = fixed_batch()["label"]
    assert len(calls) == 2 and torch.equal(calls[0], labels) and torch.equal(calls[1], torch.full_like(labels, 4))


def test_guidance_changes_the_step_when_the_ema_differs():
    plain, _ = one_step(tiny_config(), ema_shift=0.05)
    guided, _ = one_step(tiny_config("transition.guidance_w_cond=0.75"), ema_shift=0.05)
    assert not all(torch.equal(a, b) for a, b in zip(plain, guided))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A random 1-layer Dinov2 saved like a hub model: no download (no pretrained encoder is reachable here)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             patch_size=2, image_size=8)).save_pretrained(directory)
    return str(directory)


def test_repa_features_follow_the_token_grid(tiny_dinov2):
    from tim_ray.models.vision import load_vision_encoder

    encoder = load_vision_encoder(tiny_dinov2)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    features = encoder.features(images, (4, 4))
    assert features.shape == (3, 16, 16) and torch.isfinite(features).all()
    assert encoder.features(images, (2, 3)).shape == (3, 6, 16)  # non-square grids too


def test_repa_trains_the_projector(tiny_dinov2):
    cfg = tiny_config("model.repa_dim=16", f"transition.repa_encoder={tiny_dinov2!r}".replace("'", '"'))
    repa = RepaTargets(cfg, lambda x: x, "cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, text_dim=None)
    before = [p.detach().clone() for p in model.projector.parameters()]
    optimizer = build_optimizer(model, cfg, cfg.optim.lr)
    result = train_step(model, optimizer, fixed_batch(), cfg, get_path("otfm"), step_generator(0, 0, 0), repa=repa)
    assert 0 < result.metrics["repa"] < 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.projector.parameters()))


def test_repa_encoder_width_must_match_repa_dim(tiny_dinov2):
    from tim_ray.config import ConfigError

    cfg = tiny_config("model.repa_dim=8", f'transition.repa_encoder="{tiny_dinov2}"')
    with pytest.raises(ConfigError, match="must be the width"):
        RepaTargets(cfg, lambda x: x, "cpu")
