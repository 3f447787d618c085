"""`tim-ray tune --resume` on a real local Ray, through the command line: a sweep of 3 trials of tim-tiny,
interrupted (as by Ctrl-C) during its second trial, with a pickle that would leave a marker file when unpickled
planted at every path where Ray Tune keeps a pickle; the resume keeps the finished trial, resumes the cut one from
its own checkpoint, draws the third, and never unpickles a thing from the sweep directory.

One coarse run: four Ray Train starts (tens of seconds each here).
"""
import json
import os
import pickle
import signal

import pytest
from test_tune_sweep import SPACE, STEPS, start_local_ray, tiny_overrides

from tim_ray.cli import main
from tim_ray.config import load_config
from tim_ray.tune.search import draw
from tim_ray.tune.space import load_space
from tim_ray.tune.state import load_state

pytestmark = pytest.mark.ray

STAMP = "2026-01-01_00-00-00"


class _RunsCode:
    """Unpickles to a call of exec: what an attacker plants (pickled by value as builtins.exec and a string)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def code_running_pickle(marker) -> bytes:
    return pickle.dumps(_RunsCode(f"open({str(marker)!r}, 'a').write('unpickled\\n')"))


def plant_pickles(sweep_dir, marker):
    """A code-running pickle at every path where Ray Tune 2.60 reads one back on Tuner.restore, ResultGrid or
    ExperimentAnalysis: the experiment's files (raw pickles, including the .json ones read with cloudpickle, and
    cloudpickle payloads inside experiment_state), a trial directory's, and the same names in each trial run."""
    from ray._common.utils import binary_to_hex

    payload = code_running_pickle(marker)
    embedded = {"_type": "CLOUDPICKLE_FALLBACK", "value": binary_to_hex(payload)}
    tune_dir = sweep_dir / "tune"
    trial_dir = tune_dir / f"run_trial_0a1b2c3d_00001_1_{STAMP}"
    raw = [tune_dir / "tuner.pkl", tune_dir / f"searcher-state-{STAMP}.pkl", tune_dir / f"callback-states-{STAMP}.pkl",
           tune_dir / f"search_gen_state-{STAMP}.json", tune_dir / f"basic-variant-state-{STAMP}.json",
           trial_dir / "params.pkl", trial_dir / "error.pkl", trial_dir / "checkpoint_000000" / "_dict_checkpoint.pkl"]
    raw += [run / name for run in (sweep_dir / "trials").iterdir() for name in ("params.pkl", "error.pkl")]
    for path in raw:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    (tune_dir / f"experiment_state-{STAMP}.json").write_text(json.dumps({
        "trial_data": [[embedded, embedded]], "runner_data": embedded, "stats": {}, "timestamp": 0.0}))
    return len(raw) + 1


def starts(run_dir):
    """The step at which each attempt of a training run began, from its events.jsonl."""
    with open(run_dir / "events.jsonl") as f:
        return [event["step"] for event in map(json.loads, f) if event["event"] == "start"]


def files_of(directory):
    """{path: (size, modification time)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def interrupt_during(target, monkeypatch):
    """The sweep's driver stops at the target trial's first evaluation, taking the trial's run with it (as when
    `tim-ray tune` exits on Ctrl-C and its Ray goes down, or its pod dies): the trial's actor is killed, and SIGUSR1
    goes to Ray Tune's own SIGINT handler, which ends the Tune run and leaves running trials as they are. (Killed
    after its step-2 checkpoint and before step 3: a trial that Tune merely lets go trains on in the background for
    as long as Ray is up.)"""
    import ray

    from tim_ray.tune.bridge import Recorder, sweep_id

    record = Recorder.on_trial_result

    def on_trial_result(self, iteration, trials, trial, result, **info):
        record(self, iteration=iteration, trials=trials, trial=trial, result=result, **info)
        if sweep_id(trial) == target:
            ray.kill(trial.temporary_state.ray_actor, no_restart=True)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(Recorder, "on_trial_result", on_trial_result)


def test_an_interrupted_sweep_resumes_from_its_record_and_never_unpickles_the_sweep_directory(
        tmp_path, monkeypatch, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    space_file = tmp_path / "space.toml"
    space_file.write_text(SPACE)
    # A checkpoint at every evaluation, so the trial cut at its first one has a checkpoint to resume from.
    overrides = [*tiny_overrides(tmp_path), "checkpoint.every=2"]
    command = ["tune", *overrides, "--space", str(space_file), "--num-samples", "3", "--max-concurrent", "1",
               "--scheduler", "fifo", "--search", "optuna"]
    sweep_dir, marker = tmp_path / "sweep", tmp_path / "unpickled.txt"
    start_local_ray()
    try:
        with monkeypatch.context() as patched:
            interrupt_during("t001", patched)
            assert main(command) == 130
        record = json.loads((sweep_dir / "sweep.json").read_text())
        assert [(t["id"], t["status"]) for t in record["trials"]] == [("t000", "finished"), ("t001", "running")]
        # Killing the trial's actor does not stop its training run at once: it may reach step 4 before Ray goes
        # down. The resume must continue from whatever checkpoint the cut trial left.
        cut_at = max(int(p.name.split("_")[1]) for p in (sweep_dir / "trials" / "sweep_t001").glob("checkpoint_0*"))
        planted = plant_pickles(sweep_dir, marker)
        finished_run = sweep_dir / "trials" / "sweep_t000"
        finished_files = files_of(finished_run)
        capsys.readouterr()
        assert main([*command, "--resume"]) == 0
        out = capsys.readouterr().out
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS")

    assert planted >= 10 and not marker.exists()
    pickle.loads(code_running_pickle(tmp_path / "probe.txt"))  # the planted pickle does what it says when loaded
    assert (tmp_path / "probe.txt").read_text() == "unpickled\n"
    assert "resuming 3 trials of 4 steps (1 that ended are kept, 1 cut short resume from their own checkpoints)" in out
    record = json.loads((sweep_dir / "sweep.json").read_text())
    trials = {t["id"]: t for t in record["trials"]}
    assert {k: t["status"] for k, t in trials.items()} == {"t000": "finished", "t001": "finished", "t002": "finished"}
    # The finished trial was not run again; the cut one resumed from its own latest checkpoint; the third is new.
    assert starts(sweep_dir / "trials" / "sweep_t000") == [0]
    assert files_of(finished_run) == finished_files
    assert starts(sweep_dir / "trials" / "sweep_t001") == [0, cut_at]
    assert starts(sweep_dir / "trials" / "sweep_t002") == [0]
    assert trials["t001"]["history"][-1][0] == STEPS and [s for s, _ in trials["t000"]["history"]] == [2, 4]
    # The third trial's keys are the draw an uninterrupted sweep makes (a function of the seed, its index and the
    # trials before it).
    cfg = load_config(None, overrides)
    space = load_space(space_file, cfg)
    state = load_state(sweep_dir / "sweep.json", record["settings"], cfg, space)
    assert trials["t002"]["params"] == draw(space, "optuna", 0, 2, "max", state.trials[:2])

    with open(sweep_dir / "results.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 3
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
    parent = client.get_run((sweep_dir / "mlflow_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED"
    assert sorted(run.info.run_name for run in children) == ["sweep_t000", "sweep_t001", "sweep_t002"]  # t001: one
