"""A sweep's own record, <sweep dir>/sweep.json: everything `tim-ray tune --resume` rebuilds the sweep from.

It is plain JSON, rewritten (atomically) whenever a trial is drawn, starts, reports an evaluation or ends:

    {"format": "tim-ray sweep", "version": 1,
     "settings": {"num_samples": 8, "scheduler": "asha", "search": "optuna", "max_concurrent": 1, "seed": 0},
     "config": {... the base config ...}, "space": "... the space file ...",
     "trials": [{"id": "t000", "params": {"transition.p_mean": 0.2, ...}, "status": "finished", "step": 300,
                 "objective": 0.14, "per_nfe": {"1": 0.08, ...}, "history": [[100, 0.03], ...], "error": ""}, ...]}

A resume never reads Ray Tune's own experiment state, whose files are pickles: on a shared volume anyone who can
write the sweep directory could plant one that runs code when unpickled. Trial i is "t" + i in three digits (its
run is <train.name>_t<i>, so relaunching it resumes its own checkpoints); its keys are drawn by
tim_ray.tune.search. Statuses: pending (drawn), running, finished (trained every step), stopped (early, by the
scheduler), error. A record that cannot be read is a one-line SweepStateError (exit 2).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tim_ray.config import Config, ConfigError, to_dict
from tim_ray.train.eval_objective import OBJECTIVE, per_nfe_key
from tim_ray.tune.results import FINISHED, TrialRow
from tim_ray.tune.space import Space

STATE_FILE = "sweep.json"
FORMAT = "tim-ray sweep"
VERSION = 1
LIVE = ("pending", "running")
STATUSES = (*LIVE, FINISHED, "stopped", "error")


class SweepStateError(ConfigError):
    """A sweep record that cannot be resumed (exit 2)."""


def trial_id(index: int) -> str:
    return f"t{index:03d}"


@dataclass
class TrialRecord:
    id: str
    params: dict  # {dotted config key: value}, the space's keys
    status: str = "pending"
    step: int | None = None  # of the last evaluation
    objective: float | None = None  # at the last evaluation
    per_nfe: dict[int, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, objective) of every evaluation
    error: str = ""

    @property
    def live(self) -> bool:
        """Drawn or running, not ended: an interrupted sweep relaunches it."""
        return self.status in LIVE

    def to_json(self) -> dict:
        return {"id": self.id, "params": self.params, "status": self.status, "step": self.step,
                "objective": self.objective, "per_nfe": {str(n): v for n, v in self.per_nfe.items()},
                "history": [list(point) for point in self.history], "error": self.error}

    def row(self) -> TrialRow:
        status = ("unfinished" if self.live else f"error: {self.error}" if self.status == "error" else self.status)
        return TrialRow(trial_id=self.id, params=dict(self.params), status=status, step=self.step,
                        objective=self.objective, per_nfe=dict(self.per_nfe), history=list(self.history))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_ready(tree):
    """A JSON round trip (tuples become lists), to compare a config with its record."""
    return json.loads(json.dumps(tree))


@dataclass
class SweepState:
    path: Path
    settings: dict
    config: dict
    space: str
    trials: list[TrialRecord] = field(default_factory=list)

    @classmethod
    def new(cls, path: Path, settings: dict, cfg: Config, space: Space) -> "SweepState":
        state = cls(Path(path), dict(settings), _json_ready(to_dict(cfg)), space.text)
        state.save()
        return state

    def save(self) -> None:
        """Write the record atomically: a crash leaves the previous version, never half a file."""
        tree = {"format": FORMAT, "version": VERSION, "settings": self.settings, "config": self.config,
                "space": self.space, "trials": [t.to_json() for t in self.trials]}
        # A new file of a random name (O_EXCL): a name known in advance could be a link planted in the shared
        # directory, through which the write would land elsewhere.
        handle, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.fchmod(handle, 0o666 & ~_umask())  # as an ordinary new file (mkstemp makes it 0600)
        with os.fdopen(handle, "w") as f:
            f.write(json.dumps(tree, indent=1) + "\n")
        os.replace(tmp, self.path)

    # -- what the sweep's Tune callbacks and searcher record

    def trial(self, trial_id_: str) -> TrialRecord:
        return next(t for t in self.trials if t.id == trial_id_)

    def add(self, params: dict) -> TrialRecord:
        record = TrialRecord(trial_id(len(self.trials)), dict(params))
        self.trials.append(record)
        self.save()
        return record

    def started(self, trial_id_: str) -> None:
        self.trial(trial_id_).status = "running"
        self.save()

    def evaluated(self, trial_id_: str, result: dict, nfe: list[int]) -> None:
        """An evaluation of a running trial. A trial resumed from a checkpoint before its last evaluation
        evaluates those steps again: the new values replace the old."""
        if OBJECTIVE not in result or "step" not in result:
            return
        record = self.trial(trial_id_)
        step, objective = int(result["step"]), float(result[OBJECTIVE])
        if not math.isfinite(objective):  # JSON has no NaN; no objective score is one
            return
        record.history = [point for point in record.history if point[0] < step] + [(step, objective)]
        record.step, record.objective = step, objective
        record.per_nfe = {n: float(result[per_nfe_key(n)]) for n in nfe
                          if per_nfe_key(n) in result and math.isfinite(result[per_nfe_key(n)])}
        self.save()

    def ended(self, trial_id_: str, steps: int) -> None:
        """The trial ended without error: it trained every step, or the scheduler stopped it."""
        record = self.trial(trial_id_)
        record.status = FINISHED if record.step is not None and record.step >= steps else "stopped"
        self.save()

    def failed(self, trial_id_: str, message: str) -> None:
        record = self.trial(trial_id_)
        record.status, record.error = "error", message
        self.save()

    # -- what the sweep reads

    def live(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.live]

    def ended_count(self) -> int:
        return sum(not t.live for t in self.trials)

    def rows(self) -> list[TrialRow]:
        return [t.row() for t in self.trials]


def load_state(path: Path, settings: dict, cfg: Config, space: Space) -> SweepState:
    """The record of the sweep to resume, checked against the command that resumes it."""
    path = Path(path)
    if not path.is_file():
        raise SweepStateError(f"--resume: no sweep to resume in {path.parent}")
    try:
        tree = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepStateError(f"--resume: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SweepStateError(f"--resume: {path} is corrupt (not JSON: {exc.msg} at line {exc.lineno}); "
                              f"start a new sweep under another train.name") from None
    _check_header(tree, path)
    began = (("settings", settings, "--num-samples/--scheduler/--search/--max-concurrent/--seed"),
             ("config", _json_ready(to_dict(cfg)), "the base config"), ("space", space.text, "the space"))
    for key, now, what in began:
        if json.dumps(tree[key], sort_keys=True) != json.dumps(now, sort_keys=True):
            raise SweepStateError(f"--resume: {what} differs from what the sweep began with (recorded in {path}); "
                                  f"resume with the same, or start a new sweep under another train.name")
    if not isinstance(tree["trials"], list) or len(tree["trials"]) > settings["num_samples"]:
        raise SweepStateError(f"--resume: {path} is corrupt: 'trials' must be a list of at most "
                              f"{settings['num_samples']} trials")
    trials = [_trial(entry, index, space, f"--resume: {path} is corrupt: trial {index}")
              for index, entry in enumerate(tree["trials"])]
    return SweepState(path, dict(settings), tree["config"], tree["space"], trials)


def _check_header(tree, path: Path) -> None:
    if isinstance(tree, dict) and "format" not in tree and "num_samples" in tree:
        raise SweepStateError(f"--resume: {path} was written by an older tim-ray, whose sweeps resume from Ray "
                              f"Tune's pickles; this one does not read them: start a new sweep under another "
                              f"train.name")
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise SweepStateError(f"--resume: {path} is not a tim-ray sweep record")
    if tree.get("version") != VERSION:
        raise SweepStateError(f"--resume: {path} is version {tree.get('version')!r} of the sweep record; this "
                              f"tim-ray reads version {VERSION}")
    missing = [key for key in ("settings", "config", "space", "trials") if key not in tree]
    if missing:
        raise SweepStateError(f"--resume: {path} is corrupt: it lacks {', '.join(missing)}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _trial(entry, index: int, space: Space, where: str) -> TrialRecord:
    """One recorded trial, every field checked: its id names a directory, its keys become a config."""
    fields = ("id", "params", "status", "step", "objective", "per_nfe", "history", "error")
    if not isinstance(entry, dict) or set(entry) != set(fields):
        raise SweepStateError(f"{where} must be an object with exactly {', '.join(fields)}")
    if entry["id"] != trial_id(index):
        raise SweepStateError(f"{where} has id {entry['id']!r}, expected {trial_id(index)!r}")
    params = entry["params"]
    if not isinstance(params, dict) or set(params) != set(space.keys):
        raise SweepStateError(f"{where} sets {sorted(params) if isinstance(params, dict) else params!r}, not the "
                              f"space's keys {space.keys}: the record is from another space")
    for dim in space.dimensions:
        if not dim.contains(params[dim.key]):
            raise SweepStateError(f"{where} has {dim.key} = {params[dim.key]!r}, outside the space's "
                                  f"{dim.kind} {list(dim.values)}: the record is from another space")
    if entry["status"] not in STATUSES or not isinstance(entry["error"], str):
        raise SweepStateError(f"{where} has status {entry['status']!r}, not one of {', '.join(STATUSES)}")
    history, per_nfe = entry["history"], entry["per_nfe"]
    if (not (entry["step"] is None or _step(entry["step"])) or not (entry["objective"] is None
            or _number(entry["objective"])) or not isinstance(history, list)
            or not all(isinstance(p, list) and len(p) == 2 and _step(p[0]) and _number(p[1]) for p in history)
            or not isinstance(per_nfe, dict) or not all(k.isdigit() and _number(v) for k, v in per_nfe.items())):
        raise SweepStateError(f"{where}: step, objective, per_nfe or history is malformed")
    return TrialRecord(entry["id"], params, entry["status"], entry["step"], entry["objective"],
                       {int(n): float(v) for n, v in per_nfe.items()}, [(int(s), float(o)) for s, o in history],
                       entry["error"])
