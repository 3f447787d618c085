"""tim_ray.tracking without Ray: a copied run directory's store writes into the copy only, runs carry the code's
version and commit, and the browse hint fits the store (a server's page, not `mlflow ui` on an http URI)."""
import shutil
import subprocess

from mlflow.tracking import MlflowClient

from tim_ray import version
from tim_ray.config import load_config
from tim_ray.tracking import GIT_COMMIT_TAG, Tracker, browse_hint, tracking_uri


def _run(run_dir):
    cfg = load_config(None, [f"train.output_dir={run_dir.parent}", f"train.name={run_dir.name}"])
    tracker = Tracker.for_launch(cfg, run_dir)
    (run_dir / "note.txt").write_text(run_dir.name)
    tracker.log_file(run_dir / "note.txt")
    return cfg, tracker


def test_a_copied_run_directory_logs_into_its_own_artifacts(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    _, first = _run(original)
    before = sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*"))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)

    _, second = _run(copy)  # the second launch of the copy, like an eval or a resume would open it
    assert sorted(p.relative_to(original) for p in (original / "mlartifacts").rglob("*")) == before
    client = MlflowClient(tracking_uri=tracking_uri(load_config(), copy))
    for run_id in (first.run_id, second.run_id):  # the run copied along is re-pointed too
        artifact_uri = client.get_run(run_id).info.artifact_uri
        assert artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
        assert [a.path for a in client.list_artifacts(run_id)] == ["config.json", "note.txt"]
    assert (copy / "mlartifacts").is_dir() and len(list((copy / "mlartifacts").rglob("note.txt"))) == 2


def test_runs_are_tagged_with_version_and_commit(tmp_path):
    _, tracker = _run(tmp_path / "tags")
    tags = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id).data.tags
    assert tags["tim_ray.version"] == version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags[GIT_COMMIT_TAG] == head and tags["tim_ray.git_dirty"] in ("true", "false")


def test_browse_hint_fits_the_store():
    assert browse_hint("sqlite:////runs/x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////runs/x/mlflow.db"
    assert browse_hint("http://mlflow:5000/", "abc", "3") == "open http://mlflow:5000/#/experiments/3/runs/abc"
    assert browse_hint("https://mlflow.example.com") == "open https://mlflow.example.com"
