"""`tim-ray eval` on tiny checkpoints: eval.json, a table, the quality-vs-NFE plot and an MLflow run that holds them,
in the training run's store when it has one; one-line errors for metrics that do not apply."""
import json

import pytest
import torch
from data_fixtures import StandInTextEncoder
from eval_fixtures import feature_cache, write_checkpoint  # noqa: F401 (session fixture)
from mlflow.tracking import MlflowClient
from PIL import Image

from tim_ray.artifacts.checkpoint import read_state
from tim_ray.cli import main
from tim_ray.config import from_dict
from tim_ray.eval.evaluate import EvalRequest, evaluate
from tim_ray.eval.generate import ImagePipeline
from tim_ray.tracking import Tracker


def test_eval_writes_json_plot_and_an_mlflow_run(tmp_path, feature_cache, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("TIM_RAY_CACHE", str(feature_cache))
    checkpoint = write_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    assert main(["eval", str(checkpoint), "--nfe", "1,2", "--metric", "fid,kid", "--metric", "class_agreement",
                 "--metric", "consistency", "--num-samples", "12", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "NFE" in stdout and "class_agreement" in stdout and "consistency (any NFE)" in stdout

    results = json.loads((out / "eval.json").read_text())
    assert results["nfe"] == [1, 2] and results["step"] == 7 and results["weights"] == "ema"
    for nfe in ("1", "2"):
        scores = results["by_nfe"][nfe]
        assert scores["fid"] > 0 and 0 <= scores["class_agreement"] <= 1 and scores["seconds_per_image"] > 0
    assert results["nfe_independent"]["consistency"] > 0  # a randomised network does not compose
    assert Image.open(out / "quality_vs_nfe.png").size[0] > 300
    assert Image.open(out / "samples.png").size[1] > 2 * 16  # one row per NFE

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tim-ray").experiment_id])
    assert run.info.run_name == "eval-quickstart-step7" and run.info.status == "FINISHED"
    fid = client.get_metric_history(run.info.run_id, "fid")
    assert sorted((m.step, m.value) for m in fid) == [(1, results["by_nfe"]["1"]["fid"]),
                                                      (2, results["by_nfe"]["2"]["fid"])]
    (consistency,) = client.get_metric_history(run.info.run_id, "consistency")
    assert consistency.step == 0 and consistency.value == results["nfe_independent"]["consistency"]
    assert run.data.params["eval.nfe"] == "[1, 2]" and run.data.params["model.arch"] == "tim-tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "quality_vs_nfe.png", "samples.png"} <= artifacts


def test_eval_logs_into_the_training_runs_store_nested_under_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    probe = write_checkpoint(tmp_path / "probe")
    training = Tracker.create_run(from_dict(read_state(str(probe))[1]), run_dir, "quickstart")
    checkpoint = write_checkpoint(run_dir, mlflow_run_id=training.run_id)
    assert main(["eval", str(checkpoint), "--nfe", "1", "--metric", "consistency", "--num-samples", "4",
                 "--out", str(tmp_path / "eval")]) == 0
    client = MlflowClient(tracking_uri=training.uri)
    runs = client.search_runs([client.get_experiment_by_name("tim-ray").experiment_id])
    (evaluation,) = [r for r in runs if r.info.run_id != training.run_id]
    assert evaluation.data.tags["mlflow.parentRunId"] == training.run_id
    assert not (tmp_path / "eval" / "mlflow.db").exists()


@pytest.mark.parametrize("args, message", [
    (["--metric", "fdi"], "unknown metric fdi; choose from fid, kid"),
    (["--metric", "shapes"], "metric shapes scores samples against shapes data, but data.source is "
                             "'fashion-mnist'"),
    (["--metric", "fid_inception"], "fid_inception/kid_inception need --inception PATH"),
    (["--nfe", "1,x"], "--nfe must be comma-separated integers, got '1,x'"),
])
def test_metrics_that_do_not_apply_are_one_line_errors(tmp_path, capsys, args, message):
    checkpoint = write_checkpoint(tmp_path / "run")
    assert main(["eval", str(checkpoint), *args, "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "eval").exists()


def test_shapes_checkpoints_are_scored_per_category(tmp_path, monkeypatch):
    import tim_ray.models.text as text

    monkeypatch.setattr(text, "load_text_encoder", lambda name, max_tokens, **kw: StandInTextEncoder(max_tokens))
    checkpoint = write_checkpoint(tmp_path / "run", conditioning="text", in_channels=3,
                                  text_dim=StandInTextEncoder.dim,
                                  overrides=("data.source=shapes", "model.max_text_tokens=8"))
    pipeline = ImagePipeline.open(checkpoint, device="cpu")
    request = EvalRequest(nfe=[1], metrics=["shapes"], num_samples=12, seed=0, sample=pipeline.config.sample)
    results, rows = evaluate(pipeline, request)
    scores = results["by_nfe"]["1"]
    # 12 scenes cycle through the six categories; an untrained network draws no shapes, so every score is 0.
    assert {k for k in scores if k.startswith("shapes.")} == {
        "shapes.single_object", "shapes.two_object", "shapes.counting", "shapes.colors", "shapes.position",
        "shapes.color_attr"}
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k.startswith("shapes"))
    assert rows.shape == (1, 10, 3, 16, 16) and torch.isfinite(rows).all()
