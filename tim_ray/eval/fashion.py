"""A Fashion-MNIST feature network of our own, for FID/KID and class agreement without downloaded weights.

The Inception network behind the usual FID cannot be downloaded here and says little about 28x28 grey garments.
Instead a small CNN classifier is trained on the Fashion-MNIST *training* split (about half a minute on two CPU
cores); its 64-d penultimate layer is the feature space of `fid`/`kid` and its prediction the judge of
`class_agreement`. Training is deterministic (seeded init and order, one thread), and the result is cached as a
safetensors file whose name is a hash of the recipe, the architecture version and the training files' bytes, so a
changed recipe or dataset never reuses a stale network.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tim_ray.config import ConfigError
from tim_ray.data.sources.fashion_mnist import (DEFAULT_DIR, IMAGES_MAGIC, LABELS_MAGIC, SPLIT_PREFIX,
                                                read_idx)

NATIVE_SIZE = 28
NUM_CLASSES = 10
ARCH_VERSION = 1  # bump when FashionFeatureNet changes: it is part of the cache key


@dataclass(frozen=True)
class FeatureNetRecipe:
    train_samples: int = 60_000  # the first N rows of the training split
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


class FashionFeatureNet(nn.Module):
    """(N, C, H, W) images in [-1, 1] of any size -> 64 features (forward) or 10 class logits (`logits`).
    Colour input is averaged to grey and every input is resized to 28x28, the size the network was trained at."""

    num_features = 64  # torchmetrics reads this instead of probing with a dummy image

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, self.num_features)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (NATIVE_SIZE, NATIVE_SIZE):
            x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.prepare(images))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return torch.cat([self.logits(images[i:i + batch_size]).argmax(-1)
                          for i in range(0, len(images), batch_size)])


def class_agreement(net: FashionFeatureNet, images: torch.Tensor, classes) -> float:
    """The share of images the classifier assigns to the class they were asked for."""
    return (net.predict(images) == torch.as_tensor(classes)).float().mean().item()


def fashion_mnist_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of a split, read from the IDX files."""
    directory = Path(data_dir or DEFAULT_DIR)
    prefix = SPLIT_PREFIX[split]
    images = read_idx(str(directory / f"{prefix}-images-idx3-ubyte.gz"), IMAGES_MAGIC)
    labels = read_idx(str(directory / f"{prefix}-labels-idx1-ubyte.gz"), LABELS_MAGIC)
    return images, labels


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float in [-1, 1], the scale of the training data and of samples."""
    return torch.from_numpy(np.array(images, dtype=np.float32)).div(127.5).sub(1.0)[:, None]  # a writable copy


def reference_images(split: str, count: int, height: int, width: int,
                     data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of a split at height x width, resized the way training's decoder resizes them
    (tim_ray.data.geometry.fit), in [-1, 1], with their labels."""
    from PIL import Image

    from tim_ray.data.geometry import fit

    images, labels = fashion_mnist_arrays(split, data_dir)
    images, labels = images[:count], labels[:count]
    if (height, width) != images.shape[1:]:
        images = np.stack([np.asarray(fit(Image.fromarray(im), (height, width))) for im in images])
    return to_unit_range(images), torch.from_numpy(labels.astype(np.int64))


def train_feature_net(recipe: FeatureNetRecipe, data_dir: str | None = None) -> FashionFeatureNet:
    """Train the classifier with Adam on the recipe's share of the training split. Deterministic: the seed fixes
    the initialisation and the batch order, and one thread fixes the order of the floating-point sums."""
    images, labels = fashion_mnist_arrays("train", data_dir)
    x = to_unit_range(images[:recipe.train_samples])
    y = torch.from_numpy(labels[:recipe.train_samples].astype(np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(recipe.seed)
            net = FashionFeatureNet()
        order = torch.Generator().manual_seed(recipe.seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        for _ in range(recipe.epochs):
            permutation = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), recipe.batch_size):
                batch = permutation[start:start + recipe.batch_size]
                loss = F.cross_entropy(net.logits(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def default_cache_dir() -> Path:
    if os.environ.get("TIM_RAY_CACHE"):
        return Path(os.environ["TIM_RAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tim-ray"


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(recipe: FeatureNetRecipe, data_dir: str | None = None) -> str:
    directory = Path(data_dir or DEFAULT_DIR)
    files = [directory / f"train-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"Fashion-MNIST file '{path}' not found; install the Debian package "
                              "dataset-fashion-mnist")
    spec = {"arch": ARCH_VERSION, "recipe": asdict(recipe), "data": [_file_digest(str(p)) for p in files]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_feature_net(recipe: FeatureNetRecipe = FeatureNetRecipe(), data_dir: str | None = None,
                     cache_dir: str | Path | None = None) -> FashionFeatureNet:
    """The trained feature network for `recipe`, from the cache, else trained now and cached."""
    from safetensors.torch import load_file, save_file

    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    path = directory / f"fashion-features-{cache_key(recipe, data_dir)}.safetensors"
    if path.is_file():
        net = FashionFeatureNet()
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False)
    net = train_feature_net(recipe, data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(net.state_dict(), partial)
    partial.replace(path)  # atomic: a concurrent reader sees the old state or the whole file
    return net
