"""Batched sampling for sample/eval: the training grid's sample_rows is unchanged (it equals the sampler called
directly), the batch size does not change deterministic samples, and the pipeline checks image sizes."""
import pytest
import torch
from eval_fixtures import write_checkpoint

from tim_ray.config import ConfigError, SampleConfig
from tim_ray.eval.generate import ImagePipeline, sample_images
from tim_ray.eval.grid import sample_rows
from tim_ray.transition.paths import get_path
from tim_ray.transition.sampler import sample_from_config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return ImagePipeline.open(write_checkpoint(tmp_path_factory.mktemp("run")), device="cpu")


def test_sample_rows_equals_the_sampler_called_directly(pipeline):
    config = SampleConfig(cfg_scale=1.5, stochasticity=0.2)
    cond, uncond = pipeline.conditions(labels=[0, 3, 7])
    rows = sample_rows(pipeline.model, cond, uncond, (3, 1, 16, 16), [1, 3], get_path("otfm"), config, seed=4)
    noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(4))
    for row, nfe in zip(rows, [1, 3]):
        direct = sample_from_config(pipeline.model, noise, cond, uncond, path=get_path("otfm"), config=config,
                                    steps=nfe, generator=torch.Generator().manual_seed(4 + nfe)).x.float()
        assert torch.equal(row, direct.clamp(-1, 1))


def test_deterministic_samples_do_not_depend_on_the_batch_size(pipeline):
    cond, uncond = pipeline.conditions(labels=list(range(7)))
    noise = pipeline.noise(7, 16, 16, seed=0)
    whole = sample_images(pipeline.model, cond, uncond, noise, 3, pipeline.path, SampleConfig(), 0)
    batched = sample_images(pipeline.model, cond, uncond, noise, 3, pipeline.path, SampleConfig(), 0, batch_size=3)
    torch.testing.assert_close(whole, batched, atol=1e-5, rtol=0)
    assert whole.abs().max() <= 1 and whole.std() > 0.1


def test_sizes_must_fit_the_patch_grid(pipeline):
    assert pipeline.latent_shape(10, 24) == (1, 10, 24)
    for height, width in [(15, 16), (16, 0)]:
        with pytest.raises(ConfigError, match="positive multiples of 2"):
            pipeline.latent_shape(height, width)
