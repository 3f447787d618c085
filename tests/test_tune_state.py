"""The sweep's record, sweep.json (no Ray started): what it keeps of each trial, the one-line refusals of a record
that cannot be resumed, that a resumed sweep draws the trials an uninterrupted one would, and that ASHA's rungs
are rebuilt from the record."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tim_ray.cli import main
from tim_ray.config import load_config
from tim_ray.tune.space import load_space
from tim_ray.tune.state import STATE_FILE, SweepState, SweepStateError, load_state

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tune" / "shapes.toml"
SPACE_TEXT = ('[transition.interval_sampler]\nchoices = ["logit_normal_pair", "uniform_pair", "independent"]\n'
              '[transition.p_mean]\nuniform = [-1.0, 0.5]\n[transition.dde_epsilon]\nloguniform = [0.002, 0.01]\n')
SETTINGS = {"num_samples": 14, "scheduler": "asha", "search": "optuna", "max_concurrent": 1, "seed": 0}


@pytest.fixture
def base():
    return load_config(RECIPE)


@pytest.fixture
def space(tmp_path, base):
    path = tmp_path / "space.toml"
    path.write_text(SPACE_TEXT)
    return load_space(path, base)


def params(sampler="uniform_pair", p_mean=0.1, epsilon=0.005):
    return {"transition.interval_sampler": sampler, "transition.p_mean": p_mean, "transition.dde_epsilon": epsilon}


def test_the_record_keeps_each_trials_status_evaluations_and_reads_back(tmp_path, base, space):
    state = SweepState.new(tmp_path / STATE_FILE, SETTINGS, base, space)
    for _ in range(5):
        state.add(params())
    for trial in ("t000", "t001", "t002", "t003"):
        state.started(trial)
    result = {"step": 100, "objective": 0.2, "objective_nfe1": 0.1, "objective_nfe2": 0.3, "other": 1}
    state.evaluated("t000", result, [1, 2])
    state.evaluated("t000", {**result, "step": 200, "objective": 0.25}, [1, 2])
    state.evaluated("t000", {**result, "step": 300, "objective": 0.3}, [1, 2])
    state.ended("t000", 300)
    state.evaluated("t001", result, [1, 2])
    state.ended("t001", 300)  # stopped by the scheduler at 100
    state.failed("t002", "TrialFailed: nonfinite at step 7")
    state.evaluated("t003", {**result, "step": 200}, [1, 2])
    state.evaluated("t003", {**result, "step": 100, "objective": 0.15}, [1, 2])  # resumed from step 100's checkpoint
    state.evaluated("t003", {**result, "step": 200, "objective": float("nan")}, [1, 2])  # no score: not kept
    loaded = load_state(tmp_path / STATE_FILE, SETTINGS, base, space)
    assert loaded == state
    rows = {row.trial_id: row for row in loaded.rows()}
    assert {k: r.status for k, r in rows.items()} == {
        "t000": "finished", "t001": "stopped", "t002": "error: TrialFailed: nonfinite at step 7",
        "t003": "unfinished", "t004": "unfinished"}
    assert rows["t000"].history == [(100, 0.2), (200, 0.25), (300, 0.3)] and rows["t000"].per_nfe == {1: 0.1, 2: 0.3}
    assert rows["t003"].history == [(100, 0.15)] and rows["t003"].step == 100
    assert [t.id for t in loaded.live()] == ["t003", "t004"] and loaded.ended_count() == 3
    assert json.loads((tmp_path / STATE_FILE).read_text())["trials"][0]["params"] == params()


def corrupt(tree):
    tree["trials"][0]["id"] = "../../elsewhere"


@pytest.mark.parametrize("edit, message", [
    (lambda tree: "{not json", "is corrupt (not JSON: Expecting property name enclosed in double quotes at line 1)"),
    (lambda tree: dict(SETTINGS), "was written by an older tim-ray, whose sweeps resume from Ray Tune's pickles"),
    (lambda tree: {**tree, "format": "pickle"}, "is not a tim-ray sweep record"),
    (lambda tree: {**tree, "version": 2}, "is version 2 of the sweep record; this tim-ray reads version 1"),
    (lambda tree: {**tree, "space": "[transition.p_std]\nuniform = [0.5, 1.5]\n"}, "the space differs from"),
    (lambda tree: {**tree, "settings": {**SETTINGS, "seed": 1}}, "--num-samples/--scheduler/--search/"),
    (lambda tree: {**tree, "config": {**tree["config"], "optim": {}}}, "the base config differs from"),
    (lambda tree: {**tree, "trials": tree["trials"] * 8}, "'trials' must be a list of at most 14 trials"),
    (lambda tree: corrupt(tree) or tree, "trial 0 has id '../../elsewhere', expected 't000'"),
    (lambda tree: tree["trials"][1]["params"].pop("transition.p_mean") and tree,
     "trial 1 sets ['transition.dde_epsilon', 'transition.interval_sampler'], not the space's keys"),
    (lambda tree: tree["trials"][1]["params"].update({"transition.p_mean": 0.9}) or tree,
     "trial 1 has transition.p_mean = 0.9, outside the space's uniform [-1.0, 0.5]: the record is from another"),
    (lambda tree: tree["trials"][1]["params"].update({"transition.interval_sampler": "gaussian"}) or tree,
     "trial 1 has transition.interval_sampler = 'gaussian', outside the space's choices"),
    (lambda tree: tree["trials"][0].update({"status": "paused"}) or tree, "trial 0 has status 'paused', not one of"),
    (lambda tree: tree["trials"][0].update({"history": [[100, "high"]]}) or tree,
     "trial 0: step, objective, per_nfe or history is malformed"),
    (lambda tree: tree["trials"][0].update({"extra": 1}) or tree, "trial 0 must be an object with exactly id, "),
])
def test_a_record_that_cannot_be_resumed_is_one_line(tmp_path, base, space, edit, message):
    state = SweepState.new(tmp_path / STATE_FILE, SETTINGS, base, space)
    state.add(params())
    state.add(params(sampler="independent"))
    edited = edit(json.loads(state.path.read_text()))
    state.path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(SweepStateError) as caught:
        load_state(state.path, SETTINGS, base, space)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_resume_of_a_corrupt_record_exits_2_with_one_line_before_ray_starts(tmp_path, capsys):
    import ray

    sweep_dir = tmp_path / "tune-shapes"
    sweep_dir.mkdir()
    (sweep_dir / STATE_FILE).write_text('{"format": "tim-ray sweep", "version": 1, "trials": [')
    space = REPO / "configs" / "tune" / "sampler_and_ratio.toml"
    code = main(["tune", str(RECIPE), f"train.output_dir={tmp_path}", "--space", str(space), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"tim-ray: error: --resume: {sweep_dir / STATE_FILE} is corrupt (not JSON: ")
    assert not ray.is_initialized()


def objective_of(keys: dict) -> float:
    """A made-up objective with a maximum inside the space, so TPE has something to find."""
    sampler_bonus = {"logit_normal_pair": 0.1, "uniform_pair": 0.0, "independent": 0.2}
    return sampler_bonus[keys["transition.interval_sampler"]] - (keys["transition.p_mean"] + 0.3) ** 2


def run_trials(state, space, search, count, steps=300):
    """Drive the sweep's searcher as Tune does, one trial at a time: suggest, start, evaluate, end. Returns the
    suggested configs."""
    from tim_ray.tune.bridge import TrialSource
    from tim_ray.tune.trial import TRIAL_KEY

    source = TrialSource(state, space, search, SETTINGS["seed"], SETTINGS["num_samples"], "max")
    suggested = []
    for _ in range(count):
        config = source.suggest("tune-id")
        if config == source.FINISHED:
            break
        suggested.append(config)
        trial = config[TRIAL_KEY]
        state.started(trial)
        state.evaluated(trial, {"step": steps, "objective": objective_of(config)}, [])
        state.ended(trial, steps)
    return suggested


@pytest.mark.parametrize("search", ["optuna", "random"])
def test_a_resumed_sweep_draws_what_an_uninterrupted_one_would(tmp_path, base, space, search):
    """14 trials (TPE's draws begin after its 10 random start-up ones) in one go, and interrupted after 6 with the
    7th drawn and running: the resume relaunches the 7th with its keys, then draws the same 8th to 14th."""
    from tim_ray.tune.trial import TRIAL_KEY

    settings = {**SETTINGS, "search": search}
    whole = SweepState.new(tmp_path / "whole.json", settings, base, space)
    uninterrupted = run_trials(whole, space, search, 20)
    assert len(uninterrupted) == 14 and [c[TRIAL_KEY] for c in uninterrupted] == [f"t{i:03d}" for i in range(14)]

    cut = SweepState.new(tmp_path / STATE_FILE, settings, base, space)
    before = run_trials(cut, space, search, 6)
    from tim_ray.tune.bridge import TrialSource
    seventh = TrialSource(cut, space, search, 0, 14, "max").suggest("tune-id")
    cut.started(seventh[TRIAL_KEY])  # ... and the sweep is interrupted here
    resumed_state = load_state(tmp_path / STATE_FILE, settings, base, space)
    assert [t.id for t in resumed_state.live()] == ["t006"]
    after = run_trials(resumed_state, space, search, 20)
    assert after[0] == seventh  # relaunched: same id, same keys
    assert before + after == uninterrupted
    assert len({c["transition.p_mean"] for c in uninterrupted}) == 14  # no draw repeats an earlier one


def fake_trial(trial_id):
    from tim_ray.tune.trial import TRIAL_KEY

    return SimpleNamespace(trial_id=f"tune-{trial_id}", config={TRIAL_KEY: trial_id})


def test_asha_rungs_are_rebuilt_from_the_record_and_know_trials_by_their_sweep_id(tmp_path, base, space):
    from ray.tune.schedulers import TrialScheduler

    from tim_ray.tune.bridge import SweepASHA

    state = SweepState.new(tmp_path / STATE_FILE, SETTINGS, base, space)
    for objective in (0.5, 0.9):
        trial = state.add(params()).id
        state.evaluated(trial, {"step": 2, "objective": objective}, [])
        state.ended(trial, 8)

    def scheduler():
        return SweepASHA(time_attr="step", metric="objective", mode="max", max_t=9, grace_period=2,
                         reduction_factor=2)

    late = fake_trial("t002")
    fresh = scheduler()
    fresh.on_trial_add(None, late)
    assert fresh.on_trial_result(None, late, {"step": 2, "objective": 0.1}) == TrialScheduler.CONTINUE  # alone
    replayed = scheduler().replay(state)
    replayed.on_trial_add(None, late)
    assert replayed.on_trial_result(None, late, {"step": 2, "objective": 0.1}) == TrialScheduler.STOP
    again = fake_trial("t000")  # relaunched under a new Tune id: its rung-2 value is not recorded twice
    replayed.on_trial_add(None, again)
    replayed.on_trial_result(None, again, {"step": 2, "objective": 0.5})
    rung_2 = next(recorded for milestone, recorded in replayed._brackets[0]._rungs if milestone == 2)
    assert rung_2 == {"t000": 0.5, "t001": 0.9, "t002": 0.1}


def test_a_trials_own_record_of_its_evaluations_reads_back_what_was_reported(tmp_path):
    """What a relaunched trial whose training had already ended reports to Tune instead of evaluating again."""
    import numpy as np

    from tim_ray.tune.trial import EVALUATIONS_FILE, _evaluation, recorded_evaluations

    assert recorded_evaluations(tmp_path) == []
    reports = [{"step": 2, "objective": np.float64(0.25), "objective_nfe1": 0.5, "loss": 1.0},
               {"step": 4, "objective": 0.5, "objective_nfe1": 0.75}]
    with open(tmp_path / EVALUATIONS_FILE, "w") as f:
        f.write(json.dumps(_evaluation(reports[0])) + "\n" + '{"step": 3, "obj\n')  # a torn line is skipped
        f.write(json.dumps(_evaluation(reports[1])) + "\n" + '["not", "an", "evaluation"]\n')
    assert recorded_evaluations(tmp_path) == [{"step": 2, "objective": 0.25, "objective_nfe1": 0.5},
                                              {"step": 4, "objective": 0.5, "objective_nfe1": 0.75}]
