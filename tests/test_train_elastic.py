"""A spot preemption on a multi-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster): an elastic
run on two worker nodes, one node drained with a deadline and then removed, capacity added back.

Token auth is on as in cluster/ (KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every Ray container): the
two variables are set in this process before the cluster starts, so its GCS, raylets and workers (subprocesses that
inherit the environment), this driver and the `ray drain-node` call all use them. A drain-node call with a wrong
token is refused (InvalidAuthToken), so the cluster really checks the token.

What must hold: the drain makes the workers checkpoint at once (no step lost to the preemption), the run goes on
with one worker from that checkpoint, grows back to two when a node returns, finishes, and never trains on a
sample twice (train.sample_log audits every step).
"""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tim_ray.artifacts.checkpoint import read_state
from tim_ray.config import load_config
from tim_ray.train.launch import latest_checkpoint, launch

pytestmark = pytest.mark.ray

STEPS, EVERY = 200, 50  # enough steps that the drain, the removal and the restart happen mid-run
NODE = {"num_cpus": 3}  # a worker takes 2 CPUs, so a node holds one worker plus room for its data tasks


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not (found := condition()):
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)
    return found


@pytest.fixture
def token_auth(monkeypatch):
    """RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN for this test's processes. ray.cluster_utils starts the nodes
    from this process (their daemons inherit os.environ), and this process's own Ray reads the mode from its C++
    config and the token from a cache, each loaded once: both are reloaded after the change and after the undo."""
    from ray._raylet import AuthenticationTokenLoader, Config

    def reload():
        Config.initialize("")  # the config before the cache, as ray._private.authentication_test_utils does
        AuthenticationTokenLoader.instance().reset_cache()

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    reload()
    yield
    monkeypatch.undo()
    reload()


def drain_command(cluster, node_id: str, message: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address,
            "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message,
            "--deadline-remaining-seconds", "10"]


def preempt_then_return(cluster, node, run_dir: Path, log: dict) -> None:
    """The spot reclaim of `node`, as KubeRay's preStop hook does it: drain with a deadline, then the node goes;
    later a replacement node joins. (In the main thread: starting a Ray node installs signal handlers.)"""
    wait_for(lambda: any(e["event"] == "metrics" and e["step"] >= 6 for e in events(run_dir)), "training")
    subprocess.run(drain_command(cluster, node.node_id, "spot reclaim (test)"), check=True, capture_output=True)
    log["drained_at"] = time.time()
    jit = wait_for(lambda: [p for p in run_dir.glob("checkpoint_0*") if int(p.name.split("_")[1]) % EVERY],
                   "the just-in-time checkpoint")
    log["jit_step"] = int(jit[0].name.split("_")[1])
    time.sleep(1.0)  # Ray registers the report at its next health check
    cluster.remove_node(node)
    log["removed_at"] = time.time()
    wait_for(lambda: [e for e in events(run_dir) if e["event"] == "start" and e["world_size"] == 1],
             "the restart on one worker")
    log["restarted_at"] = time.time()
    cluster.add_node(**NODE)


def test_drained_node_checkpoints_then_the_run_shrinks_and_grows_back(tmp_path, monkeypatch, token_auth):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    # Its own temp dir (the worker nodes take the head's): short, Ray's unix socket paths have a length limit.
    ray_tmp = tempfile.mkdtemp(prefix="te-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": ray_tmp})
    cluster.add_node(**NODE)
    spot = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    cfg = load_config(None, [
        "model.arch=tim-tiny", "model.conditioning=class", "data.source=fashion-mnist", "data.max_samples=2048",
        "data.height=16", "data.width=16", "ray.num_workers=2", "ray.min_workers=1", "ray.cpus_per_worker=2",
        "ray.elastic_resize_check_s=2", "train.batch_size=4", f"train.steps={STEPS}", "train.log_every=2",
        "train.eval_every=1000", f"checkpoint.every={EVERY}", "checkpoint.stop_check_every=1",
        "train.sample_log=true", "eval.nfe=[1]", f"train.output_dir={tmp_path}", "train.name=elastic"])
    run_dir = tmp_path / "elastic"
    log: dict = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        outcome: dict = {}
        training = threading.Thread(target=lambda: outcome.update(code=launch(cfg)), daemon=True)
        training.start()
        # A client with a wrong token (run while the workers start; the node id is one no node has).
        wrong = subprocess.Popen(drain_command(cluster, "ab" * 28, "wrong token (test)"), text=True,
                                 env={**os.environ, "RAY_AUTH_TOKEN": "0" * 64}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        preempt_then_return(cluster, spot, run_dir, log)
        refused = wrong.communicate(timeout=120)[0]
        training.join(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert wrong.returncode != 0 and "InvalidAuthToken" in refused, refused[-2000:]
    assert outcome.get("code") == 0

    starts = [(e["step"], e["world_size"]) for e in events(run_dir) if e["event"] == "start"]
    assert starts[0] == (0, 2) and starts[1] == (log["jit_step"], 1), starts  # resumed at the drain checkpoint
    assert starts[-1][1] == 2, f"the run never grew back to 2 workers: {starts}"
    final = read_state(latest_checkpoint(cfg))[0]
    assert final.step == STEPS and final.world_size == 2

    # The audit: for each step keep the worker group that ran it last; every kept sample id is distinct, every
    # step is there once, and each step holds a full global batch of that group's size.
    kept: dict[int, tuple[int, int]] = {}
    rows = [json.loads(line) for path in (run_dir / "samples_consumed").glob("rank*.jsonl")
            for line in path.read_text().splitlines()]
    for row in rows:
        kept[row["step"]] = max(kept.get(row["step"], (-1, 0)), (row["attempt"], row["world"]))
    ids = [i for row in rows if (row["attempt"], row["world"]) == kept[row["step"]] for i in row["ids"]]
    assert sorted(kept) == list(range(STEPS))
    assert len(ids) == len(set(ids)) == sum(4 * world for _, world in kept.values()) == final.samples_seen
    print(f"\nelastic: drain -> JIT checkpoint at step {log['jit_step']}; removal -> restart on 1 worker in "
          f"{log['restarted_at'] - log['removed_at']:.1f} s; starts (step, world) {starts}")
