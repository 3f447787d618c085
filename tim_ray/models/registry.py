"""Named TiM sizes and the one builder the trainer, sampler and exporter call.

Paper sizes (docs/math.md §11; exact parameter counts checked by tests/test_models_tim.py):
  B/4       c2i, SD-VAE latents 4×32×32, 1000 classes
  XL/2      c2i, SD-VAE latents 4×32×32, 1000 classes
  XL/1      c2i, DC-AE latents 32×16×16, 1000 classes
  T2I-XL/1  t2i, DC-AE latents, Gemma-3-1B features (text_dim 1152)
CPU sizes:
  tim-tiny  unit tests
  tim-s     the CPU quickstart (pixel space 32×32, patch 4 → 64 tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tim_ray.config import ConfigError, ModelConfig
from tim_ray.models.tim import TiM


@dataclass(frozen=True)
class TiMArch:
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    adaln_hidden_size: int  # the modulation SwiGLU's hidden width ("lora_hidden_size" in the official configs)
    encoder_depth: int  # REPA features are taken after this many blocks
    projector_dim: int = 2048  # hidden width of the REPA projector MLP


ARCHS: dict[str, TiMArch] = {
    "tim-tiny": TiMArch(hidden_size=32, depth=2, num_heads=2, patch_size=2, adaln_hidden_size=16,
                        encoder_depth=1, projector_dim=64),
    "tim-s": TiMArch(hidden_size=128, depth=4, num_heads=4, patch_size=4, adaln_hidden_size=64,
                     encoder_depth=2, projector_dim=256),
    "B/4": TiMArch(hidden_size=768, depth=12, num_heads=12, patch_size=4, adaln_hidden_size=256, encoder_depth=4),
    "XL/2": TiMArch(hidden_size=1152, depth=28, num_heads=16, patch_size=2, adaln_hidden_size=384, encoder_depth=8),
    "XL/1": TiMArch(hidden_size=1152, depth=28, num_heads=16, patch_size=1, adaln_hidden_size=384, encoder_depth=8),
    "T2I-XL/1": TiMArch(hidden_size=1152, depth=28, num_heads=16, patch_size=1, adaln_hidden_size=384,
                        encoder_depth=8),
}


def get_arch(name: str) -> TiMArch:
    if name not in ARCHS:
        raise ConfigError(f"model.arch = {name!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[name]


def build_model(cfg_model: ModelConfig, in_channels: int, text_dim: int | None, device="cpu",
                dtype: torch.dtype | None = None) -> TiM:
    """The TiM of `cfg_model.arch` for inputs of `in_channels` channels (the codec's latent channels).

    `text_dim` is the text encoder's feature width (TextEncoder.dim; MiniLM: 384) and is required for text
    conditioning, ignored for class conditioning. device="meta" builds without memory, for FSDP2's
    build-shard-materialise path (then `to_empty` and `initialize_weights()`).
    """
    arch = get_arch(cfg_model.arch)
    with torch.device(device):
        model = TiM(
            in_channels=in_channels, hidden_size=arch.hidden_size, depth=arch.depth, num_heads=arch.num_heads,
            patch_size=arch.patch_size, adaln_hidden_size=arch.adaln_hidden_size,
            encoder_depth=arch.encoder_depth, conditioning=cfg_model.conditioning,
            num_classes=cfg_model.num_classes, text_dim=text_dim, repa_dim=cfg_model.repa_dim,
            projector_dim=arch.projector_dim, attention=cfg_model.attention, rope_grid=cfg_model.rope_grid,
            cross_attention_mask=cfg_model.cross_attention_mask)
    return model if dtype is None else model.to(dtype)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
