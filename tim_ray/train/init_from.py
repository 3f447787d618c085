"""`tim-ray train --init-from EXPORT_OR_CHECKPOINT`: start a run from earlier weights (an import of the released
TiM, an export, a checkpoint or run directory), weights only: fresh optimizer, step 0, the EMA a copy of them.

The driver loads and checks the weights before Ray starts (a network that does not fit the config is one line
naming the keys, exit 2); the workers receive them through the object store and load them into the network before
it is sharded. A resumed run's own checkpoint then replaces them, so --init-from on a resume changes nothing.
The REPA projector is the one part that may differ: a run with REPA starts a missing projector from scratch, a run
without drops the source's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tim_ray.artifacts.export import PROJECTOR, ExportError, check_state_dict, fit_state_dict, load_for_inference
from tim_ray.config import Config
from tim_ray.models.registry import get_arch

PARENT_TAGS = ("tim_ray.init_from", "tim_ray.init_weights")  # MLflow tags on the new run: source path, weight set


@dataclass
class InitWeights:
    source: Path
    weights: str  # "ema" | "model"
    tensors: dict[str, torch.Tensor]
    run_id: str | None  # the source's own MLflow run, when it recorded one
    notes: list[str]  # settings of the source that this run changes, one line each

    def announce(self, tracker) -> list[str]:
        """Record the source on the run (tags; nested under the source's own run when this store has it) and
        return the lines that tell the user."""
        nested = tracker.record_parent(self.run_id, dict(zip(PARENT_TAGS, (str(self.source), self.weights))))
        parent = f", under its MLflow run {self.run_id}" if nested else ""
        return [f"starting from the {self.weights} weights of {self.source} (fresh optimizer, step 0{parent})",
                *(f"note: {note}" for note in self.notes)]


def _mismatch(cfg: Config, theirs: Config) -> str | None:
    mine, source = cfg.model, theirs.model
    if get_arch(mine.arch) != get_arch(source.arch):
        return f"architecture {source.arch}, the config's is {mine.arch}"
    if mine.conditioning != source.conditioning:
        return f"{source.conditioning} conditioning, the config's is {mine.conditioning}"
    if mine.conditioning == "class" and mine.num_classes != source.num_classes:
        return f"{source.num_classes} classes, the config's model.num_classes is {mine.num_classes}"
    return None


def prepare_init(cfg: Config, path: str, ema: bool | None) -> InitWeights:
    """The weights of `path` (EMA by default when it has them; ema=False: the trained ones), checked against the
    network that `cfg` builds: the same architecture and conditioning, and every tensor's name and shape."""
    from tim_ray.models.registry import build_model
    from tim_ray.train.plan import model_inputs

    loaded = load_for_inference(path, ema=ema)
    if (why := _mismatch(cfg, loaded.config)) is not None:
        raise ExportError(f"--init-from {path}: its network has {why}; they must match")
    tensors = {k: v for k, v in loaded.model.state_dict().items()
               if cfg.model.repa_dim or not k.startswith(PROJECTOR)}
    in_channels, text_dim = model_inputs(cfg)
    check_state_dict(build_model(cfg.model, in_channels, text_dim, device="meta"), tensors, f"--init-from {path}",
                     optional=(PROJECTOR,))
    notes = [f"the weights were trained with model.{key} = {getattr(loaded.config.model, key)!r}, this run uses "
             f"{getattr(cfg.model, key)!r}" for key in ("rope_grid", "cross_attention_mask")
             if getattr(loaded.config.model, key) != getattr(cfg.model, key)]
    return InitWeights(loaded.source, loaded.weights, tensors, loaded.state.mlflow_run_id, notes)


def load_init(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the --init-from weights into a worker's (not yet sharded) network."""
    fit_state_dict(model, tensors, "--init-from", optional=(PROJECTOR,))
