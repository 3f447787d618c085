"""The frozen vision encoder REPA aligns the network's tokens to (docs/math.md §8), loaded through transformers.

Any transformers vision backbone with a patch grid works (DINOv2, e.g. facebook/dinov2-base, for GPU users;
tests build a tiny random Dinov2 offline). It is loaded from the hub or a local directory like any model: no
pretrained encoder ships with tim-ray, and none can be downloaded on a machine without network access.
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

from tim_ray.config import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VisionEncoder:
    """Patch features of images: `features(images, grid)` -> (B, h·w, dim), one feature per network token."""

    def __init__(self, model: torch.nn.Module, mean, std):
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(model.config.patch_size)
        self.dim = int(model.config.hidden_size)
        device = next(model.parameters()).device
        self.mean = torch.tensor(mean, device=device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).reshape(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`images` (B, C, H, W) in [-1, 1] (grey is repeated to RGB) are mapped to [0, 1], bicubic-resized to
        (h·P, w·P) for the encoder's patch size P, so that its patch grid is the network's token grid (h, w), and
        normalised by the encoder's mean and std. Returns its last hidden state without the prefix tokens (class,
        registers): (B, h·w, dim), row-major like the network's tokens."""
        h, w = grid
        pixels = ((images.float() + 1) / 2).clamp(0, 1)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = nnf.interpolate(pixels, size=(h * self.patch_size, w * self.patch_size), mode="bicubic",
                                 align_corners=False).clamp(0, 1)
        pixels = (pixels.to(self.mean.device) - self.mean) / self.std
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, hidden.shape[1] - h * w:].to(images.device)


def load_vision_encoder(name: str, device: torch.device | str = "cpu") -> VisionEncoder:
    """The encoder `name` (hub id or local directory) in fp32 on `device`, frozen; its image processor's mean and
    std when it has one, else ImageNet's. ConfigError (one line) when it cannot be loaded."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(name).to(device)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"transition.repa_encoder = {name!r} cannot be loaded: {str(exc).splitlines()[0]}") \
            from None
    if not hasattr(model.config, "patch_size"):
        raise ConfigError(f"transition.repa_encoder = {name!r} is not a patch-based vision encoder")
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError):  # a model directory without preprocessor_config.json
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return VisionEncoder(model, mean, std)
