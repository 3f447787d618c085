"""The sweep's record (tim_ray.tune.state) wired into one Ray Tune run: the searcher that hands Tune its trials,
the callback that records what they do, and the ASHA scheduler that knows trials by their sweep id.

Tune's own trial ids are new in every run of the sweep (a resume is a new Tune run, never Tuner.restore); each
trial's config carries its sweep id under TRIAL_KEY, and everything here keys on that.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from tim_ray.train.eval_objective import OBJECTIVE
from tim_ray.tune.search import draw
from tim_ray.tune.space import Space
from tim_ray.tune.state import SweepState
from tim_ray.tune.trial import TRIAL_KEY


def sweep_id(trial) -> str:
    return trial.config[TRIAL_KEY]


class TrialSource(Searcher):
    """First the trials an interruption cut short (same id and keys: each resumes from its own checkpoints), then
    new draws (tim_ray.tune.search) until the sweep has `num_samples` trials."""

    def __init__(self, state: SweepState, space: Space, search: str, seed: int, num_samples: int, mode: str):
        super().__init__(metric=OBJECTIVE, mode=mode)
        self.state, self.space, self.search, self.seed, self.num_samples = state, space, search, seed, num_samples
        self.relaunch = [record.id for record in state.live()]

    def suggest(self, trial_id: str):
        if self.relaunch:
            record = self.state.trial(self.relaunch.pop(0))
        elif len(self.state.trials) < self.num_samples:
            index = len(self.state.trials)
            record = self.state.add(draw(self.space, self.search, self.seed, index, self.mode, self.state.trials))
        else:
            return Searcher.FINISHED
        return {**record.params, TRIAL_KEY: record.id}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass  # the next draw reads the record, which Recorder keeps

    def save(self, checkpoint_path: str) -> None:
        pass  # Tune's copy of the search is never read back: the record is the sweep's state


class Recorder(Callback):
    """Keeps the sweep's record as Tune runs its trials. A trial that an interruption (Ctrl-C) cuts off gets no
    call here, so it stays running in the record, and a resume relaunches it."""

    def __init__(self, state: SweepState, steps: int, nfe: list[int]):
        self.state, self.steps, self.nfe = state, steps, list(nfe)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state.started(sweep_id(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.state.evaluated(sweep_id(trial), result, self.nfe)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.state.ended(sweep_id(trial), self.steps)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.state.failed(sweep_id(trial), _last_error_line(trial))


def _last_error_line(trial) -> str:
    """The last line of the error Tune wrote for the trial (a text file in the driver's private Tune directory)."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1].strip()[:120] if lines else "the trial failed"


class SweepASHA(ASHAScheduler):
    """ASHA keyed by sweep id, with rungs rebuilt from the record: a resumed sweep compares its trials with every
    evaluation recorded before, as an uninterrupted one would, and a relaunched trial is not judged twice at a rung
    it already passed."""

    def replay(self, state: SweepState) -> "SweepASHA":
        for record in state.trials:
            if record.history:
                stand_in = SimpleNamespace(trial_id=record.id)
                super().on_trial_add(None, stand_in)
                for step, objective in record.history:
                    super().on_trial_result(None, stand_in, {self._time_attr: step, self._metric: objective})
                super().on_trial_remove(None, stand_in)
        return self

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, _keyed(trial))

    def on_trial_result(self, tune_controller, trial, result):
        return super().on_trial_result(tune_controller, _keyed(trial), result)

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, _keyed(trial), result)

    def on_trial_remove(self, tune_controller, trial):
        super().on_trial_remove(tune_controller, _keyed(trial))


def _keyed(trial):
    return SimpleNamespace(trial_id=sweep_id(trial))
