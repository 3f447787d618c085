"""What sampling needs besides the network, shared by training's sample grids and by `tim-ray sample`/`eval`:
the codec for the network's channels, and the condition dicts (cond, uncond) for prompts or class labels."""
from __future__ import annotations

import torch

from tim_ray.config import ModelConfig
from tim_ray.models.codecs import PIXEL, Codec, CodecError, load_codec


def codec_for(model_cfg: ModelConfig, channels: int, device) -> Codec:
    """The config's codec for a network of `channels` input channels: the pixel codec takes the channel count
    (1 for grey Fashion-MNIST); an autoencoder must produce exactly that many latent channels."""
    if model_cfg.codec == PIXEL:
        return load_codec(PIXEL, image_channels=channels)
    codec = load_codec(model_cfg.codec, kind=model_cfg.codec_kind, sample_posterior=model_cfg.codec_sample_posterior,
                       device=device)
    if codec.channels != channels:
        raise CodecError(f"codec '{model_cfg.codec}' gives {codec.channels}-channel latents but the network takes "
                         f"{channels}")
    return codec


def prompt_conditions(text_encoder, prompts: list[str]) -> tuple[dict, dict]:
    """(cond, uncond) for a text-conditional TiM: the prompts' features and the empty caption's, for CFG."""
    features, mask = text_encoder.encode(list(prompts))
    empty, empty_mask = text_encoder.encode([""] * len(prompts))
    return {"context": features, "context_mask": mask}, {"context": empty, "context_mask": empty_mask}


def label_conditions(labels, num_classes: int, device) -> tuple[dict, dict]:
    """(cond, uncond) for a class-conditional TiM; the null label is num_classes."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    return {"y": labels}, {"y": torch.full_like(labels, num_classes)}
