"""Drawing images from a trained TiM outside training: a loaded checkpoint with its codec and text encoder, the
conditions for prompts or labels, and batched sampling that is a pure function of the seed."""
from __future__ import annotations

import dataclasses

import torch

from tim_ray.config import ConfigError, SampleConfig
from tim_ray.eval.conditions import codec_for, label_conditions, prompt_conditions
from tim_ray.transition.paths import TransitionPath, get_path
from tim_ray.transition.sampler import sample_from_config


def slice_conditions(cond: dict | None, start: int, stop: int) -> dict | None:
    """Rows start:stop of every tensor in a condition dict."""
    if cond is None:
        return None
    return {k: v[start:stop] if torch.is_tensor(v) else v for k, v in cond.items()}


@torch.no_grad()
def sample_images(model, cond: dict, uncond: dict | None, noise: torch.Tensor, nfe: int, path: TransitionPath,
                  config: SampleConfig, seed: int, decode=None, batch_size: int | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] on the CPU from `noise` (N, ...) and N conditions, `batch_size` rows at a
    time. Stochastic steps draw from one generator seeded with seed + nfe, so the result is a pure function of
    (noise, seed, nfe, batch_size); with one batch it matches `grid.sample_rows`."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + nfe)
    step = batch_size or len(noise)
    out = []
    for start in range(0, len(noise), step):
        stop = min(start + step, len(noise))
        x = sample_from_config(model, noise[start:stop].to(device), slice_conditions(cond, start, stop),
                               slice_conditions(uncond, start, stop), path=path, config=config, steps=nfe,
                               generator=generator).x.float()
        out.append((decode(x) if decode else x).clamp(-1, 1).cpu())
    return torch.cat(out)


def pick_device(name: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N that this machine has; None = cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's error lists twenty device types tim-ray cannot run on
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got '{name}'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class ConditionError(ConfigError):
    """Prompts for a class-conditional model, labels for a text one, or labels out of range."""


class ImagePipeline:
    """A loaded TiM with its codec and, for text models, its text encoder (loaded on first use, so a request with
    the wrong kind of condition fails before the encoder loads), ready to sample at any size it takes."""

    def __init__(self, loaded, codec, device):
        self.loaded, self.codec, self.device = loaded, codec, torch.device(device)
        self._text = None

    @classmethod
    def open(cls, path, ema: bool | None = None, device=None) -> "ImagePipeline":
        from tim_ray.artifacts.export import load_for_inference

        device = pick_device(device)
        loaded = load_for_inference(path, ema=ema, device=device)
        return cls(loaded, codec_for(loaded.config.model, loaded.model.in_channels, device), device)

    @property
    def config(self):
        return self.loaded.config

    @property
    def model(self):
        return self.loaded.model

    @property
    def path(self) -> TransitionPath:
        return get_path(self.config.transition.path)

    @property
    def class_conditional(self) -> bool:
        return self.config.model.conditioning == "class"

    @property
    def text(self):
        if self._text is None and not self.class_conditional:
            from tim_ray.models.text import load_text_encoder

            model_cfg = self.config.model
            self._text = load_text_encoder(model_cfg.text_encoder, model_cfg.max_text_tokens, device=self.device,
                                           cache_size=model_cfg.text_cache)
        return self._text

    def conditions(self, prompts: list[str] | None = None, labels: list[int] | None = None) -> tuple[dict, dict]:
        if self.class_conditional:
            if prompts:
                raise ConditionError("this checkpoint is class-conditional: give class labels (--class), not prompts")
            n = self.config.model.num_classes
            bad = [label for label in labels or [] if not 0 <= label < n]
            if bad or not labels:
                raise ConditionError(f"class labels must be in [0, {n - 1}], got {bad or 'none'}")
            return label_conditions(labels, n, self.device)
        if labels:
            raise ConditionError("this checkpoint is text-conditional: give prompts (--prompt/--prompts), "
                                 "not class labels")
        if not prompts:
            raise ConditionError("give at least one prompt")
        return prompt_conditions(self.text, prompts)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape of a height x width image; one line naming the multiple if the size does not fit
        the codec's downsampling and the network's patch size (RoPE itself takes any grid), or the limit if it
        is a size its training data would have rejected as absurd (data.max_aspect_ratio, data.max_image_pixels:
        a grid the model never saw, and a run of hours or an exhausted memory)."""
        multiple = self.codec.downsample * self.model.patch_size
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ConfigError(f"image size {height}x{width} does not fit this model: height and width must be "
                              f"positive multiples of {multiple} (patch {self.model.patch_size} x codec "
                              f"downsampling {self.codec.downsample})")
        d = self.config.data
        if max(height, width) > d.max_aspect_ratio * min(height, width) or height * width > d.max_image_pixels:
            raise ConfigError(f"image size {height}x{width} is beyond the sizes this model's data takes: aspect "
                              f"ratio at most {d.max_aspect_ratio:g} (data.max_aspect_ratio), at most "
                              f"{d.max_image_pixels} pixels (data.max_image_pixels)")
        return self.codec.latent_shape(height, width)

    def noise(self, count: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Starting noise for `count` images, drawn on the CPU from `seed` (the same on every device)."""
        shape = (count, *self.latent_shape(height, width))
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def generate(self, cond: dict, uncond: dict, noise: torch.Tensor, nfe: int, config: SampleConfig,
                 batch_size: int | None = None) -> torch.Tensor:
        if config.stochasticity > 0 and not self.path.supports_stochastic:
            raise ConfigError(f"the {self.path.name} path has no stochastic transition; use stochasticity 0")
        config = dataclasses.replace(config, nfe=nfe)
        return sample_images(self.model, cond, uncond, noise, nfe, self.path, config, config.seed,
                             decode=self.codec.decode, batch_size=batch_size)
