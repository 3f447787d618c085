"""Latent codecs: what the TiM is trained on. Images are (B, C, H, W) in [-1, 1] on both sides.

- "pixel": the identity; latents are the images, with however many channels they have.
- a diffusers AutoencoderKL (SD-VAE family) or AutoencoderDC (DC-AE) by hub id or local path.
  latent = (z - shift_factor) · scaling_factor with both read from the autoencoder's config
  (SD-VAE: scaling 0.18215, no shift; DC-AE f32c32-SANA: 0.41407). KL encodes with a posterior sample or its mean;
  DC-AE is deterministic.
"""
from __future__ import annotations

import importlib.util

import torch

from tim_ray.config import ConfigError
from tim_ray.models.hub import Source, first_line, load_failure, locate

PIXEL = "pixel"
KINDS = ("auto", "kl", "dc")
_CLASS_KINDS = {"AutoencoderKL": "kl", "AutoencoderDC": "dc"}


class CodecError(ConfigError):
    """A codec that cannot be found or loaded, or an image size it cannot take. One line."""


class Codec:
    """encode: images -> latents; decode: latents -> images; latent_shape: image shape -> latent shape."""

    name: str
    channels: int  # latent channels
    downsample: int  # image pixels per latent pixel, per axis
    image_channels: int | None  # None: any (pixel keeps what it gets)

    def latent_shape(self, *dims: int) -> tuple[int, int, int]:
        """latent_shape(h, w) or latent_shape(image_channels, h, w) -> (C, h', w')."""
        if len(dims) not in (2, 3):
            raise TypeError("latent_shape takes (h, w) or (channels, h, w)")
        height, width = dims[-2:]
        if height % self.downsample or width % self.downsample:
            raise CodecError(f"codec '{self.name}' needs image sizes divisible by {self.downsample}, "
                             f"got {height}x{width}")
        if len(dims) == 3 and self.image_channels is not None and dims[0] != self.image_channels:
            raise CodecError(f"codec '{self.name}' encodes {self.image_channels}-channel images, got {dims[0]}")
        channels = dims[0] if len(dims) == 3 and self.image_channels is None else self.channels
        return channels, height // self.downsample, width // self.downsample

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """Identity. `channels` is what `latent_shape(h, w)` reports (Fashion-MNIST: 1); encode takes any count."""

    def __init__(self, channels: int = 3):
        self.name, self.channels, self.downsample, self.image_channels = PIXEL, channels, 1, None

    def encode(self, images, generator=None):
        return images

    def decode(self, latents):
        return latents


class AutoencoderCodec(Codec):
    """A frozen diffusers AutoencoderKL or AutoencoderDC in eval mode; encode/decode run under no_grad and
    return float32 on the autoencoder's device."""

    def __init__(self, name: str, kind: str, vae, sample_posterior: bool):
        self.name, self.kind, self.vae, self.sample_posterior = name, kind, vae, sample_posterior
        config = vae.config
        self.channels = config.latent_channels
        self.image_channels = config.in_channels
        levels = config.block_out_channels if kind == "kl" else config.encoder_block_out_channels
        self.downsample = 2 ** (len(levels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, images, generator=None):
        images = images.to(device=self._param().device, dtype=self._param().dtype)
        if self.kind == "kl":
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        else:
            z = self.vae.encode(images).latent
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents):
        z = latents.to(device=self._param().device, dtype=self._param().dtype)
        images = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
        return images.clamp(-1, 1).float()


PIXEL_HINT = "or 'pixel'"


def _kind_of(name: str, source: Source, kind: str) -> str:
    from diffusers import AutoencoderKL

    if kind not in KINDS:
        raise CodecError(f"codec kind '{kind}' is not one of {', '.join(KINDS)}")
    try:
        config = AutoencoderKL.load_config(source.location, local_files_only=source.local_files_only)
    except (OSError, ValueError) as exc:
        raise CodecError(load_failure("codec", name, source, exc, PIXEL_HINT)) from None
    if kind != "auto":
        return kind
    class_name = config.get("_class_name")
    if class_name not in _CLASS_KINDS:
        raise CodecError(f"codec '{name}' is a {class_name or 'model of unknown class'}, not AutoencoderKL or "
                         "AutoencoderDC; set model.codec_kind to kl or dc if it is one of those")
    return _CLASS_KINDS[class_name]


def load_codec(name: str = PIXEL, kind: str = "auto", sample_posterior: bool = True, device="cpu",
               image_channels: int = 3, dtype: torch.dtype | None = None) -> Codec:
    """"pixel" (identity with `image_channels` channels) or a diffusers autoencoder by hub id or local path.
    `kind` picks AutoencoderKL ("kl") or AutoencoderDC ("dc"); "auto" reads the config's class name."""
    if name == PIXEL:
        return PixelCodec(image_channels)
    from diffusers import AutoencoderDC, AutoencoderKL

    source = locate(name, "codec", CodecError, PIXEL_HINT)
    kind = _kind_of(name, source, kind)
    cls = AutoencoderKL if kind == "kl" else AutoencoderDC
    try:
        vae = cls.from_pretrained(source.location, local_files_only=source.local_files_only,
                                  torch_dtype=dtype or torch.float32,
                                  low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError) as exc:
        raise CodecError(f"cannot load codec '{name}' as {cls.__name__}: {first_line(exc)}") from None
    vae = vae.to(device).eval().requires_grad_(False)
    return AutoencoderCodec(name, kind, vae, sample_posterior)
