"""Tiny checkpoints written the way training writes them (save_checkpoint, one process), for export, sampling and
evaluation tests. Their weights are randomised away from the zero init, so F ≠ 0 and the EMA differs from the
trained weights."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from tim_ray.artifacts.checkpoint import TrainState, save_checkpoint
from tim_ray.config import load_config, to_dict
from tim_ray.models.registry import build_model
from tim_ray.train.ema import ShardLocalEMA

MINILM_DIM = 384


def tiny_config(conditioning: str = "class", *overrides: str):
    return load_config(None, ["model.arch=tim-tiny", f"model.conditioning={conditioning}", "data.height=16",
                              "data.width=16", "eval.num_samples=8", *overrides])


def write_checkpoint(run_dir: Path, conditioning: str = "class", step: int = 7, ema: bool = True, seed: int = 0,
                     overrides: tuple[str, ...] = (), in_channels: int = 1, text_dim: int = MINILM_DIM,
                     mlflow_run_id: str | None = None) -> Path:
    """<run_dir>/checkpoint_<step>/ of a tim-tiny model; returns the checkpoint directory."""
    cfg = tiny_config(conditioning, *overrides, f"ema.enabled={str(ema).lower()}")
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=in_channels, text_dim=text_dim if conditioning == "text" else None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    average = None
    if ema:
        average = ShardLocalEMA(model, cfg.ema.decay)
        for value in average.params.values():
            value.add_(0.01 * torch.randn_like(value))
    optimizer = torch.optim.AdamW(model.parameters())
    directory = run_dir / f"checkpoint_{step:08d}"
    with warnings.catch_warnings():  # DCP notes it saves in one process
        warnings.simplefilter("ignore")
        save_checkpoint(str(directory), model, optimizer, average, TrainState(step=step, mlflow_run_id=mlflow_run_id), to_dict(cfg), rank=0)
    return directory


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """A cache holding the default Fashion-MNIST feature network, trained once per session (about 20 s)."""
    from tim_ray.eval.fashion import load_feature_net

    directory = tmp_path_factory.getbasetemp() / "feature-cache"
    load_feature_net(cache_dir=directory)  # trains unless an earlier module of this session did
    return directory


class CodeRunningPickle:
    """Unpickling this creates the file `target`: the proof that a loader ran code from a crafted pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))
