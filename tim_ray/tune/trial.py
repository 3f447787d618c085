"""One trial of a sweep: a Ray Tune function trainable that runs a short Ray Train training run of its own.

The trial is a Train *driver* (Ray's pattern for Tune over Train V2): it builds the trial's config (the sweep's base
config with the sampled keys set), opens its MLflow run nested under the sweep's, and fits a TorchTrainer on the
same worker loop as `tim-ray train`. The loop reports the objective at every evaluation (tim_ray.train.eval_objective);
`ObjectiveReport` forwards exactly those reports to Tune, so each Tune result is one evaluation and the scheduler
can stop a poor trial early. A trial is known by its sweep id (tim_ray.tune.state), which its Tune config carries
under TRIAL_KEY: Tune's own trial ids change in every run of a sweep. Running a trial again (a resumed sweep)
continues from its own latest checkpoint, because Ray Train resumes any run whose name and storage it has seen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tim_ray.config import Config, dump_toml, from_dict
from tim_ray.tracking import Tracker
from tim_ray.train.eval_objective import OBJECTIVE
from tim_ray.tune.space import apply_params

TRIALS_DIR = "trials"
EVALUATIONS_FILE = "objective.jsonl"  # in the trial's run directory: one JSON line per evaluation
TRIAL_KEY = "tim_ray_trial"  # the sweep id in a trial's Tune config (no config key: those are dotted)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs from the sweep's driver."""

    base: dict  # to_dict of the sweep's base config
    sweep_dir: str
    tracking_uri: str  # the sweep's MLflow store ("" = tracking off)
    parent_run_id: str | None


def trial_name(base: Config, trial_id: str) -> str:
    return f"{base.train.name}_{trial_id}"


def trial_config(plan: TrialPlan, params: dict, trial_id: str) -> Config:
    """The base config with the trial's sampled keys, its own run name and directory, and the sweep's MLflow store."""
    base = from_dict(plan.base)
    cfg = apply_params(base, params, f"trial {trial_id}")
    cfg.train.name = trial_name(base, trial_id)
    cfg.train.output_dir = str(Path(plan.sweep_dir) / TRIALS_DIR)
    cfg.tracking.uri = plan.tracking_uri
    return cfg


def _objective_report_callback(run_dir: Path):
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        """Tune's bridge from a Train run, passing on only the reports that carry the objective: a checkpoint
        between evaluations is not a Tune result (and would lack the metric that Tune requires in every result).
        Each one is also appended to the trial's EVALUATIONS_FILE, which outlives the Tune run that heard it."""

        def after_report(self, run_context, metrics, checkpoint):
            if OBJECTIVE in metrics[0]:
                with open(run_dir / EVALUATIONS_FILE, "a") as f:
                    f.write(json.dumps(_evaluation(metrics[0])) + "\n")
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReport()


def _evaluation(metrics: dict) -> dict:
    """The step and the objective scores of a report (plain numbers: JSON's)."""
    scores = {key: float(value) for key, value in metrics.items() if key.startswith(OBJECTIVE)
              and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"step": int(metrics["step"]), **scores}


def recorded_evaluations(run_dir: Path) -> list[dict]:
    """The trial's evaluations in its EVALUATIONS_FILE (JSON lines; a line that is not one is skipped)."""
    try:
        lines = (run_dir / EVALUATIONS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    evaluations = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(
                entry.get(OBJECTIVE), (int, float)):
            evaluations.append(_evaluation(entry))
    return evaluations


class TrialFailed(RuntimeError):
    """A trial that ended without finishing (a diverged run, a bad checkpoint); Tune records it as an error."""


def run_trial(params: dict, plan: TrialPlan, data) -> None:
    """The Tune trainable (bound to `plan` and the sweep's training data with tune.with_parameters)."""
    import ray.train

    from tim_ray.train.launch import build_trainer, run_dir_of

    keys = {key: value for key, value in params.items() if key != TRIAL_KEY}
    cfg = trial_config(plan, keys, params[TRIAL_KEY])
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    tracker = Tracker.for_run_dir(cfg, run_dir, parent_run_id=plan.parent_run_id)
    trainer = build_trainer(cfg, run_dir, tracker, data, callbacks=(_objective_report_callback(run_dir),))
    evaluated_before = len(recorded_evaluations(run_dir))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError:
        tracker.finish("FAILED")
        raise
    outcome = result.return_value or {"status": "finished"}
    if outcome["status"] != "finished":
        tracker.finish("FAILED")
        raise TrialFailed(f"{outcome['status']} at step {outcome.get('step')}: {outcome.get('message', '')}")
    if len(recorded_evaluations(run_dir)) == evaluated_before:
        _report_earlier_evaluations(run_dir)
    tracker.finish("FINISHED")


def _report_earlier_evaluations(run_dir: Path) -> None:
    """A relaunched trial whose training had already ended (its run went on after the sweep was interrupted)
    evaluates nothing: Tune hears its evaluations from the trial's own record of them instead."""
    from ray import tune

    evaluations = recorded_evaluations(run_dir)
    if not evaluations:
        raise TrialFailed(f"it had trained every step, but {run_dir / EVALUATIONS_FILE} holds no evaluation")
    for evaluation in evaluations:
        tune.report(evaluation)
