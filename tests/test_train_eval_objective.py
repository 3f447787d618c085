"""The in-training objective: multi-NFE scores of the EMA weights, the same images from any number of ranks, and a
shapes score that is 1 for the ground truth of its own captions and low for another scene's."""
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tim_ray.config import ConfigError, load_config
from tim_ray.data.sources.shapes import render
from tim_ray.eval.evaluate import eval_targets
from tim_ray.models.registry import build_model
from tim_ray.train.ema import ShardLocalEMA
from tim_ray.train.eval_objective import objective_samples, objective_scores, rank_share, score_samples
from tim_ray.transition.paths import get_path

TEXT_DIM = 8


class HashedText:
    """A stand-in text encoder: fixed random features per caption, so conditions are deterministic and distinct."""

    dim = TEXT_DIM

    def encode(self, captions):
        features = torch.stack([torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(
            zlib.crc32(c.encode()))) for c in captions])
        return features, torch.ones(len(captions), 4, dtype=torch.bool)


def shapes_setup(seed=0):
    cfg = load_config(None, ["model.arch=tim-tiny", "data.source=shapes", "data.height=8", "data.width=8",
                             "eval.nfe=[1, 2]", "eval.num_samples=5", "eval.objective=shapes"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=3, text_dim=TEXT_DIM).eval()
    with torch.no_grad():  # away from the zero init, where every jump is the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    feed = SimpleNamespace(text=HashedText(), sample_shape=(3, 8, 8), decode=lambda x: x,
                           device=torch.device("cpu"))
    return cfg, model, feed


@pytest.mark.parametrize("count, world", [(1, 1), (5, 2), (6, 3), (7, 4), (3, 4)])
def test_rank_shares_are_equal_and_cover_every_sample_in_order(count, world):
    shares = [rank_share(count, rank, world) for rank in range(world)]
    assert {len(s) for s in shares} == {math.ceil(count / world)}
    assert [i for s in shares for i in s][:count] == list(range(count))


def test_scores_are_the_metric_per_nfe_and_their_mean():
    cfg, model, feed = shapes_setup()
    scores = objective_scores(cfg, model, None, feed, get_path("otfm"))
    assert set(scores) == {"objective", "objective_nfe1", "objective_nfe2"}
    assert scores["objective"] == pytest.approx((scores["objective_nfe1"] + scores["objective_nfe2"]) / 2)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert objective_scores(cfg, model, None, feed, get_path("otfm")) == scores  # fixed noise and conditions


def test_samples_come_from_the_ema_weights_and_leave_the_trained_ones_in_place():
    cfg, model, feed = shapes_setup()
    targets = eval_targets(cfg, cfg.eval.num_samples)
    ema = ShardLocalEMA(model, 0.99)
    for value in ema.params.values():
        value.add_(0.05 * torch.randn_like(value))
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    with_ema = objective_samples(cfg, model, ema, feed, get_path("otfm"), targets)
    assert all(torch.equal(p, trained[name]) for name, p in model.named_parameters())
    raw = objective_samples(cfg, model, None, feed, get_path("otfm"), targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.params[name])
    ema_as_model = objective_samples(cfg, model, None, feed, get_path("otfm"), targets)
    for nfe in cfg.eval.nfe:
        assert with_ema[nfe].shape == (cfg.eval.num_samples, 3, 8, 8)
        assert torch.equal(with_ema[nfe], ema_as_model[nfe])
        assert not torch.allclose(with_ema[nfe], raw[nfe])


def _rank_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg, model, feed = shapes_setup()
        samples = objective_samples(cfg, model, None, feed, get_path("otfm"),
                                    eval_targets(cfg, cfg.eval.num_samples))
        if rank == 1:  # not rank 0: every rank holds all the images
            torch.save(samples, out_file)
    finally:
        dist.destroy_process_group()


def test_two_ranks_draw_the_same_images_as_one(tmp_path):
    cfg, model, feed = shapes_setup()
    alone = objective_samples(cfg, model, None, feed, get_path("otfm"), eval_targets(cfg, cfg.eval.num_samples))
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "samples.pt")), nprocs=2)
    together = torch.load(tmp_path / "samples.pt")
    for nfe in cfg.eval.nfe:  # 5 samples on 2 ranks: 3 each, the padding dropped
        torch.testing.assert_close(together[nfe], alone[nfe], atol=1e-5, rtol=0)


def test_the_shapes_score_is_one_for_the_truth_of_the_captions_and_low_for_other_scenes():
    cfg = load_config(None, ["data.source=shapes", "eval.objective=shapes", "eval.num_samples=60"])
    targets = eval_targets(cfg, cfg.eval.num_samples)
    truth = torch.from_numpy(np.stack([render(s) for s in targets.scenes])).permute(0, 3, 1, 2)
    images = truth.float() / 127.5 - 1  # what the sampler returns: (N, C, H, W) in [-1, 1]
    assert len(targets.prompts) == 60 and targets.scenes[0]["height"] == 32
    assert score_samples("shapes", images, targets) >= 0.98
    assert score_samples("shapes", images.roll(6, dims=0), targets) < 0.3


@pytest.mark.parametrize("overrides, message", [
    (["eval.objective=fid"], "eval.objective = 'fid' is not one of , shapes, class_agreement"),
    (["eval.objective=shapes"], "eval.objective shapes scores samples against shapes data, but data.source is "
                                "'fashion-mnist'"),
    (["eval.objective=shapes", "data.source=shapes", "model.conditioning=class"],
     "it needs model.conditioning = 'text', got 'class'"),
    (["eval.objective=class_agreement", "data.source=shapes"],
     "eval.objective class_agreement scores samples against fashion-mnist data, but data.source is 'shapes'"),
    (["eval.objective=class_agreement", "eval.num_samples=0"], "eval.num_samples must be > 0, got 0"),
])
def test_an_objective_that_does_not_fit_the_data_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
