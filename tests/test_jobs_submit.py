"""The platform path on a real local Ray 2.60 head with its job server and token authentication on.

The commands are the platform guide's own (docs/platform.md lines marked "# run by tests/test_jobs_submit.py"):
start a head, `ray job submit` the quickstart job of jobs/ (4 steps), read its status and logs. Then what the job
left is checked as a user would: the checkpoint on disk and the MLflow run through the client. The same head then
serves as the node that the GPU workers' preStop hook (cluster/raycluster.yaml) drains. The MLflow server starts
from cluster/mlflow.yaml's own arguments, environment and auth settings (ConfigMap), with a stand-in for its Secret.

Only processes this module started are stopped, by their id: never `ray stop`, which ends every Ray on the machine.
"""
import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_cluster_manifests import ROOT, doc_commands

pytestmark = pytest.mark.ray

HERE = "# run by tests/test_jobs_submit.py"
GUIDE_DASHBOARD = "127.0.0.1:8265"
GUIDE_OUTPUT = "/tmp/tim-ray-smoke"
VENV_BIN = str(Path(sys.executable).parent)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(leader: int) -> list[int]:
    """Processes of the session `leader` started (start_new_session=True): Ray's daemons and workers."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of /proc/PID/stat: the session id
            pids.append(int(stat.parent.name))
    return pids


def _stop_sessions(*leaders: int, grace_s: float = 5) -> None:
    """SIGTERM every process of these sessions, SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [p for leader in leaders for p in _session_pids(leader)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(not _is_zombie(p) for leader in leaders for p in _session_pids(leader)):
            time.sleep(0.5)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _run(line: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -o pipefail\n{line}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_http(url: str, headers: dict, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180):
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not come up within {timeout_s:.0f} s; its log: {log.read_text()[-2000:]}")
        time.sleep(1)


def _mlflow_server(root: Path, port: int) -> tuple[list[str], list[str], dict[str, str], dict[str, str]]:
    """cluster/mlflow.yaml's init and server commands, with /mnt/tim under `root` and bound to 127.0.0.1:port; the
    server's environment, its auth settings (the ConfigMap's file, written under `root`) and fresh values for the
    keys of Secret mlflow-auth, which is returned too."""
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "mlflow.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    def local(argv):
        argv = [a.replace("/mnt/tim", str(root)) for a in argv]
        for flag, value in [("--host", "127.0.0.1"), ("--port", str(port))]:
            if flag in argv:
                argv[argv.index(flag) + 1] = value
        return argv

    secret, env = {}, {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            key = item["valueFrom"]["secretKeyRef"]["key"]
            env[item["name"]] = secret.setdefault(key, secrets.token_hex(16))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for volume in [v for v in pod["volumes"] if "configMap" in v]:
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                         and d["metadata"]["name"] == volume["configMap"]["name"]]
        for name, text in config_map["data"].items():
            path = root / mounts[volume["name"]].lstrip("/") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.replace("/mnt/tim", str(root)))
            env = {k: v.replace(f"{mounts[volume['name']]}/{name}", str(path)) for k, v in env.items()}
    env["HOME"] = str(root)  # the pod's HOME is its /tmp emptyDir; here a private folder plays that part
    init, server = local(pod["initContainers"][0]["command"]), local(container["command"])
    return init, [os.path.join(VENV_BIN, server[0]), *server[1:]], env, secret


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The guide's local head (plus isolation: free ports, a private temp dir, a bounded object store) and an
    MLflow server from cluster/mlflow.yaml, started side by side. Yields what the tests need."""
    work = tmp_path_factory.mktemp("platform")
    ray_tmp = tempfile.mkdtemp(prefix="tr-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    gcs, dashboard, client, agent, mlflow_port = _free_ports(5)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "RAY_ADDRESS": ""}
    env.pop("RAY_AUTH_TOKEN", None)
    lines = [line.replace(GUIDE_DASHBOARD, f"127.0.0.1:{dashboard}").replace(GUIDE_OUTPUT, str(work / "runs"))
             for line in doc_commands(HERE)]
    for line in [x for x in lines if x.startswith("export ")]:
        out = _run(f"{line}\nenv -0", env)
        assert out.returncode == 0, out.stderr
        env = dict(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
    assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN"), "the guide must turn token auth on"
    (start,) = [x for x in lines if x.startswith("ray start ")]
    head_argv = shlex.split(start, comments=True) + [
        "--block", f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={ray_tmp}", "--object-store-memory=536870912", "--disable-usage-stats"]
    head_log, mlflow_log = work / "ray_start.log", work / "mlflow.log"
    init, server, mlflow_env, mlflow_secret = _mlflow_server(work / "mnt", mlflow_port)
    subprocess.run(init, check=True)
    started = []
    try:
        with open(head_log, "w") as hl, open(mlflow_log, "w") as ml:
            head = subprocess.Popen(head_argv, env=env, cwd=ROOT, stdout=hl, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            started.append(head.pid)
            mlflow = subprocess.Popen(server, env={**env, **mlflow_env}, stdout=ml, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            started.append(mlflow.pid)
        auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", auth, "the Ray job server", head, head_log)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", {}, "the MLflow server", mlflow, mlflow_log)
        yield {"env": env, "lines": lines, "work": work, "gcs": f"127.0.0.1:{gcs}",
               "dashboard": f"http://127.0.0.1:{dashboard}", "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "mlflow_root": work / "mnt" / "mlflow", "mlflow_secret": mlflow_secret}
    finally:
        _stop_sessions(*started)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_quickstart_job_from_the_guide_succeeds_with_checkpoint_and_mlflow_run(cluster):
    from mlflow.tracking import MlflowClient

    from tim_ray.artifacts.checkpoint import read_state

    env, work = cluster["env"], cluster["work"]
    steps = [x for x in cluster["lines"] if not x.startswith(("export ", "ray start "))]
    assert [s.split()[:3] for s in steps] == [["ray", "job", "submit"], ["ray", "job", "status"],
                                              ["ray", "job", "logs"]]
    submit, status, logs = (_run(s, env, timeout=600) for s in steps)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout[-4000:]}\n{submit.stderr[-2000:]}"
    assert status.returncode == 0 and "Job 'tim-smoke' succeeded" in status.stdout, status.stdout + status.stderr
    assert logs.returncode == 0 and "tim-ray train: done" in submit.stdout + logs.stdout

    run_dir = work / "runs" / "quickstart"
    checkpoint = run_dir / "checkpoint_00000004"
    assert checkpoint.is_dir(), f"no checkpoint at step 4 in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    state, _ = read_state(str(checkpoint))  # the trainer's own reader: state.json and the DCP shards
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert state.step == 4 and state.mlflow_run_id == run_id and list((checkpoint / "dcp").glob("*.distcp"))
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mse")] == [2, 4]


def test_job_server_refuses_a_client_without_the_token(cluster):
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(cluster["work"])  # no ~/.ray/auth_token to fall back on
    out = _run(f"ray job list --address {cluster['dashboard']}", env)
    assert out.returncode != 0 and "token" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


def test_mlflow_server_of_the_manifest_requires_login_and_serves_its_service_names_only(cluster, monkeypatch):
    from mlflow.tracking import MlflowClient

    url = f"{cluster['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = cluster["mlflow_secret"]["username"], cluster["mlflow_secret"]["password"]

    def status(host: str, login: tuple[str, str] | None = (user, password)) -> int:
        headers = {"Host": host}
        if login:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("mlflow:5000", login=None) == 401 and status("mlflow:5000", login=(user, "wrong")) == 401
    assert {h: status(h) for h in ["mlflow:5000", "mlflow.tim.svc.cluster.local:5000", "localhost:5000",
                                   "attacker.example.com", "10.1.2.3:5000"]} == {
        "mlflow:5000": 200, "mlflow.tim.svc.cluster.local:5000": 200, "localhost:5000": 200,
        "attacker.example.com": 403, "10.1.2.3:5000": 403}
    # tim-ray's client, with the credentials the Ray pods get from the Secret.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(tracking_uri=cluster["mlflow"])
    run = client.create_run(client.create_experiment("platform-test"))
    client.log_metric(run.info.run_id, "mse", 0.5, step=1)
    assert (cluster["mlflow_root"] / "mlflow.db").is_file(), "the store is not where the manifest puts it"
    assert (cluster["mlflow_root"] / "basic_auth.db").is_file(), "the user store is not on the shared volume"


def test_prestop_hook_drains_the_ray_node_and_waits_for_training_workers(cluster):
    """The GPU workers' preStop hook from cluster/raycluster.yaml, line by line against the head. Its drain line
    must be accepted by Ray. Its wait line runs in a private PID namespace, as in a pod, so that other Ray
    processes on this machine do not count: a stand-in `ray::RayTrainWorker` lives 15 s, and the loop must end right
    after it, not at the 100 s deadline. (Ray's CLI finds its node by looking for the local raylet process, so the
    drain line cannot run in that namespace.) Runs last: the node stays drained."""
    spec = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())["spec"]
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-spot"]
    shell, flag, script = group["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    drain, wait = script.strip().splitlines()
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"], "HOSTNAME": "tim-ray-gpu-spot-test"}

    out = subprocess.run([shell, flag, drain.replace("|| true", "")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"Ray did not accept the drain: {out.stderr[-2000:]}"
    status = _run(f"{sys.executable} -c {shlex.quote(NODE_STATUS)} {cluster['gcs']}", env)
    assert status.returncode == 0, status.stderr
    (node,) = json.loads(status.stdout)
    # Draining (it stays up while the job's leftover actors live), or, had it been idle, gone for preemption.
    assert node["status"] == "DRAINING" or "preemption" in (node["message"] or "").lower(), node

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to give the wait loop its own PID namespace, as in a pod")
    worker_end, hook_end = cluster["work"] / "worker_end", cluster["work"] / "hook_end"
    # The stand-in's name is assembled at run time: this script's own command line must not contain it.
    pod = (f"name=ray::Ray; name+=TrainWorker\n( (exec -a \"$name\" sleep 15); date +%s.%N > {worker_end} ) &\n"
           f"sleep 0.2\n{shlex.join([shell, flag, wait])}\ndate +%s.%N > {hook_end}")
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", pod], capture_output=True,
                         text=True, timeout=150)
    if out.returncode != 0 and "unshare" in out.stderr:
        pytest.skip(f"unshare is not permitted here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    waited = float(hook_end.read_text()) - float(worker_end.read_text())
    assert 0 <= waited < 10, f"the hook returned {waited:.1f} s after the training worker ended"


NODE_STATUS = """
import json, sys
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.util.state import list_nodes
status = get_cluster_status(sys.argv[1])
nodes = {n.node_id: n.node_status for n in status.active_nodes + status.idle_nodes}
print(json.dumps([{"status": nodes.get(n.node_id, n.state), "message": n.state_message}
                  for n in list_nodes(address=sys.argv[1])]))
"""
