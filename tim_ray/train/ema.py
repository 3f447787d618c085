"""Exponential moving average of the parameters, kept shard-local.

Under FSDP2 each parameter is a DTensor holding this rank's shard; the EMA is a clone of that DTensor, so every rank
keeps only its own shard of the average (no second full model anywhere) and DCP saves and reshards it like the
parameters themselves.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class ShardLocalEMA:
    """θ_ema ← decay·θ_ema + (1 - decay)·θ after each optimizer step (docs/math.md §9); starts as a copy of θ."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.params

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.params[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Run `model` with the EMA weights (e.g. to draw samples), restoring the trained weights afterwards."""
        _reshard(model)
        saved = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                saved[name] = p.detach().clone()
                p.copy_(self.params[name].to(p.dtype))
        try:
            yield model
        finally:
            _reshard(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(saved[name])


class EMAModel:
    """The EMA network as a callable for the enhanced target: each call runs `model` with the EMA weights swapped
    in, under no_grad (two weight copies per call: no second model is kept, so it works on FSDP2 shards)."""

    def __init__(self, ema: ShardLocalEMA, model: nn.Module):
        self.ema, self.model = ema, model

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with self.ema.swapped_in(self.model):
            return self.model(*args, **kwargs)


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded after a forward; swap shards only in the sharded state."""
    if hasattr(model, "reshard"):
        model.reshard()
