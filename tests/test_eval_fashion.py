"""The Fashion-MNIST feature network and the FID/KID/class-agreement built on it, validated before they are trusted:
the classifier is accurate on the held-out split, real-vs-real distances are small and degraded images score far
worse, the numbers equal an independent scipy/numpy computation, and training and caching are deterministic."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from eval_fixtures import feature_cache  # noqa: F401 (session fixture)

from tim_ray.config import ConfigError
from tim_ray.eval import fashion
from tim_ray.eval.distances import TorchScriptFeatures, extract_features, feature_distances
from tim_ray.eval.fashion import FeatureNetRecipe, class_agreement, load_feature_net, reference_images

N = 1000


@pytest.fixture(scope="module")
def net(feature_cache):  # noqa: F811
    return load_feature_net(cache_dir=feature_cache)


@pytest.fixture(scope="module")
def test_split():
    return reference_images("test", N, 32, 32)


def blur(images):
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 256
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), kernel[None, None])


def test_classifier_is_accurate_on_the_held_out_split(net, test_split):
    images, labels = test_split
    assert class_agreement(net, images, labels) >= 0.85  # measured 0.88 (2 epochs, trained on the train split)
    wrong = labels[torch.randperm(N, generator=torch.Generator().manual_seed(0))]
    assert class_agreement(net, images, wrong) < 0.2  # chance is 0.1
    assert class_agreement(net, images, (labels + 1) % 10) < 0.1


def test_fid_and_kid_rank_real_above_degraded(net, test_split):
    images, _ = test_split
    real = extract_features(net, images)
    other_real = extract_features(net, reference_images("train", N, 32, 32)[0])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    same = feature_distances(real, other_real)
    for degraded in (blur(images), (images + 0.2 * noise).clamp(-1, 1)):
        worse = feature_distances(real, extract_features(net, degraded))
        # measured: train vs test FID 2.4, KID 2.0; blurred 39 / 63; noised (σ 0.2) 9.6 / 23
        assert worse["fid"] > 3 * same["fid"] and worse["kid"] > 5 * same["kid"], (same, worse)
    assert same["fid"] < 5


def test_distances_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(80, 6))
    b = rng.normal(size=(70, 6)) * 1.3 + 0.4
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)

    def kernel(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    def unbiased_mean(k):
        return (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))

    # With fewer than KID_SUBSET_SIZE rows every KID subset is the whole (equal-size) set: the plain unbiased MMD².
    b = b[:70]
    a70 = a[:70]
    kid = unbiased_mean(kernel(a70, a70)) + unbiased_mean(kernel(b, b)) - 2 * kernel(a70, b).mean()
    got = feature_distances(torch.from_numpy(a), torch.from_numpy(b), which=("fid",))
    assert got["fid"] == pytest.approx(fid, rel=1e-6)
    got = feature_distances(torch.from_numpy(a70), torch.from_numpy(b), which=("kid",))
    assert got["kid"] == pytest.approx(kid, rel=1e-6)


def test_training_is_deterministic_and_the_cache_is_keyed_by_recipe(tmp_path, monkeypatch):
    small = FeatureNetRecipe(train_samples=512, epochs=1, batch_size=64)
    first, second = fashion.train_feature_net(small), fashion.train_feature_net(small)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    cached = load_feature_net(small, cache_dir=tmp_path)
    monkeypatch.setattr(fashion, "train_feature_net", lambda *a, **k: pytest.fail("trained despite the cache"))
    again = load_feature_net(small, cache_dir=tmp_path)
    for a, b in zip(cached.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert fashion.cache_key(small) != fashion.cache_key(FeatureNetRecipe(train_samples=512, epochs=1, seed=1))
    assert len(list(tmp_path.glob("fashion-features-*.safetensors"))) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_inception_plugs_in_and_a_missing_one_is_one_line(tmp_path, test_split):
    class Pool(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-2:] == (299, 299)
            return F.adaptive_avg_pool2d(x, 4).flatten(1)  # 3 x 4 x 4 = 48 features

    path = tmp_path / "inception.pt"
    torch.jit.script(Pool()).save(str(path))
    features = TorchScriptFeatures(path)
    assert features.num_features == 48
    images = test_split[0][:8]
    assert features(images).shape == (8, 48)
    with pytest.raises(ConfigError, match="does not exist") as info:
        TorchScriptFeatures(tmp_path / "missing.pt")
    assert "\n" not in str(info.value)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="cannot load"):
        TorchScriptFeatures(tmp_path / "junk.pt")
