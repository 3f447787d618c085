"""`tim-ray tune` end to end on a real local Ray: 3 trials x 4 steps of tim-tiny on 16x16 shapes, 2 at a time, ASHA.

One coarse run (each trial is a Ray Train start, tens of seconds here). The assertions read what a user would look
at: the results table, the best config through `tim-ray config validate`, the MLflow parent and nested runs, and
Ray's placement group table (Train V2 leaks the groups of trials that Tune ends when ray[default] is missing).
"""
import csv
import dataclasses
import os
import socket
import time

import pytest

from tim_ray.cli import main
from tim_ray.config import ConfigError, load_config
from tim_ray.tune.sweep import SweepRequest, run_sweep

pytestmark = pytest.mark.ray

SPACE = """
[transition.interval_sampler]
choices = ["logit_normal_pair", "uniform_pair"]

[transition.p_mean]
uniform = [-1.0, 0.5]

[transition.dde_epsilon]
loguniform = [0.002, 0.01]
"""
STEPS = 4


def tiny_overrides(output_dir):
    return ["model.arch=tim-tiny", "data.source=shapes", "data.max_samples=128", "data.height=16", "data.width=16",
            "train.batch_size=8", f"train.steps={STEPS}", "train.log_every=2", "train.eval_every=2",
            "checkpoint.every=4", "eval.nfe=[1, 2]", "eval.num_samples=8", "eval.objective=shapes",
            f"train.output_dir={output_dir}", "train.name=sweep"]


def tiny_sweep_config(output_dir):
    return load_config(None, tiny_overrides(output_dir))


def start_local_ray():
    """A local Ray of our own whose workers find its State API by RAY_API_SERVER_ADDRESS. Train's placement-group
    cleaner asks the State API whether a trial's controller is alive; with several Ray instances on the machine
    (other test runs) it cannot tell which is its own and dies, and a stopped trial's placement group leaks."""
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by Ray's processes
    ray.init(address="local", num_cpus=8, dashboard_port=port, include_dashboard=True, log_to_driver=False)


def placement_group_states(timeout_s=60.0):
    """Every placement group's state, once all are REMOVED or `timeout_s` has passed (Ray removes the groups of
    a finished or stopped Train run from a detached cleaner, so it can take a moment)."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        states = [pg["state"] for pg in ray.util.placement_group_table().values()]
        if all(state == "REMOVED" for state in states) or time.time() > deadline:
            return states
        time.sleep(2)


def test_sweep_of_three_trials_writes_results_best_config_and_nested_mlflow_runs(tmp_path, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    cfg = tiny_sweep_config(tmp_path)
    request = SweepRequest(space=str(space), num_samples=3, scheduler="asha", search="random", max_concurrent=2)
    start_local_ray()
    try:
        started = time.time()
        assert run_sweep(cfg, request) == 0
        print(f"sweep: {time.time() - started:.0f} s")
        states = placement_group_states()
        # Resuming a finished sweep runs nothing again (no Tune run) and rewrites the same results.
        assert run_sweep(cfg, dataclasses.replace(request, resume=True)) == 0
        assert "tim-ray tune: resuming" not in capsys.readouterr().out
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS")
    assert states and set(states) == {"REMOVED"}, states

    sweep_dir = tmp_path / "sweep"
    assert not (sweep_dir / "tune").exists()  # Tune's own state (pickles) never lands in the sweep directory
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(row["status"] in ("finished", "stopped") for row in rows), rows
    objectives = [float(row["objective"]) for row in rows]
    assert objectives == sorted(objectives, reverse=True) and all(0.0 <= value <= 1.0 for value in objectives)
    # The best config is the best trial that trained every step (a stopped one was judged earlier).
    best_row = next(row for row in rows if row["status"] == "finished")
    assert int(best_row["step"]) == STEPS
    for row in rows:  # the objective is the mean over eval.nfe
        assert float(row["objective"]) == pytest.approx((float(row["nfe 1"]) + float(row["nfe 2"])) / 2, abs=1e-3)

    best = sweep_dir / "best.toml"
    capsys.readouterr()
    assert main(["config", "validate", str(best)]) == 0
    assert "valid" in capsys.readouterr().out
    best_cfg = load_config(best)
    assert best_cfg.transition.interval_sampler == best_row["transition.interval_sampler"]
    assert best_cfg.transition.p_mean == pytest.approx(float(best_row["transition.p_mean"]), rel=1e-3)
    assert best_cfg.train.name == "sweep_best" and best_cfg.train.steps == STEPS
    for name in ("objective_vs_step.png", "objective_vs_params.png"):
        assert (sweep_dir / name).stat().st_size > 0

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
    parent = client.get_run((sweep_dir / "mlflow_run_id").read_text().strip())
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(float(best_row["objective"]), abs=1e-3)
    assert {"results.csv", "best.toml", "space.toml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(f"sweep_{row['trial']}" for row in rows)
    by_name = {run.info.run_name: run for run in children}
    for row in rows:
        run = by_name[f"sweep_{row['trial']}"]
        assert run.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")
        history = client.get_metric_history(run.info.run_id, "objective")
        assert history[-1].step == int(row["step"]) and history[-1].value == pytest.approx(float(row["objective"]))
        assert run.data.params["transition.interval_sampler"] == row["transition.interval_sampler"]

    with pytest.raises(ConfigError, match="already holds a sweep: add --resume"):
        run_sweep(cfg, request)
