"""What a finished `tim-ray train` leaves for others: its final checkpoint as an export (tim_ray.artifacts.export) in
<run dir>/export/step_<step>, logged as the artifact `export` of its MLflow run, and registered as a new version of
the registered model `tracking.registered_model` when the config names one. The export is what `tim-ray sample`,
`eval` and `train --init-from` take, and what the MLflow UI shows as the run's product."""
from __future__ import annotations

from pathlib import Path

from tim_ray.artifacts.checkpoint import read_state
from tim_ray.artifacts.export import export_checkpoint
from tim_ray.config import Config

ARTIFACT_DIR = "export"


def publish_export(cfg: Config, run_dir: Path, tracker, checkpoint) -> str:
    """Export, log and register the final checkpoint (a ray.train.Checkpoint or None); returns a line that says
    what was done."""
    if checkpoint is None:
        return "no final checkpoint to export"
    if "://" in checkpoint.path:
        return f"final checkpoint on remote storage ({checkpoint.path}): export it with `tim-ray export` where it is"
    step = read_state(checkpoint.path)[0].step
    out = run_dir / ARTIFACT_DIR / f"step_{step:07d}"
    if not out.exists():  # a run finished again at the same step has exported it already
        export_checkpoint(checkpoint.path, out, ema=cfg.ema.enabled)
    tracker.log_dir(out, ARTIFACT_DIR)
    line = f"export ({'EMA' if cfg.ema.enabled else 'trained'} weights): {out}"
    if tracker.enabled:
        line += f", logged to MLflow run {tracker.run_id} as '{ARTIFACT_DIR}'"
        if cfg.tracking.registered_model:
            version = tracker.register(cfg.tracking.registered_model, ARTIFACT_DIR)
            line += f", registered as {cfg.tracking.registered_model} version {version}"
    return line
