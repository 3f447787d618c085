"""Every way a `tim-ray train` driver is stopped on a real Ray cluster, and where the next launch starts.

One local head (`ray start --head`: its own ports and temp dir, token auth on as in cluster/) and one run, stopped
three ways in turn, each launch resuming the one before, with one worker SIGKILLed in the third launch:

1. submitted as the platform guide does (jobs/quickstart.sh with the shipped jobs/runtime_env.yaml), then
   `ray job stop`: the driver has its workers checkpoint the step they are on and exits before Ray's SIGKILL;
2. submitted again: it starts at that step; then its driver is SIGKILLed (it can neither checkpoint nor close its
   MLflow run);
3. `tim-ray train` started in a shell against the head (RAY_ADDRESS): it starts at the newest checkpoint job 2
   completed; as soon as its own next periodic checkpoint verifies, its Ray Train worker process
   (`ray::RayTrainWorker`, forked by this head's raylet) is SIGKILLed: Ray starts a new worker group within the
   same launch, at the newest checkpoint on disk; then SIGTERM of the driver: a checkpoint at the step it is on,
   exit 0.

Each launch, and the worker group restarted after the killed worker, must start at the newest complete and verified
checkpoint on disk (0 checkpointed steps lost), and each driver stop must leave its own step's checkpoint as that
newest one. A launch after launch 3 would start there by the same rule that launches 2 and 3 are checked on
(tests/test_train_stop.py runs that resume on a local Ray). Each launch is its own MLflow run in the run
directory's sqlite store, tagged with the run of the launch before it; the SIGKILLed launch's run, left RUNNING, is
closed as KILLED by the next launch.

The second test checks the MLflow side alone on a sqlite store (no Ray): only a run left RUNNING is closed.

A drain is covered in tests/test_train_elastic.py (a ray.cluster_utils.Cluster with token auth on, the same
environment variables as here) and the preStop hook that runs it in tests/test_jobs_submit.py; a killed worker's
bit-exact resume in tests/test_train_resume.py. Only processes this module started are stopped, by their id (the
killed worker is found among the processes of this module's `ray start` session).
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_jobs_submit import VENV_BIN, _free_ports, _is_zombie, _run, _session_pids, _stop_sessions, _wait_http
from test_cluster_manifests import ROOT

from tim_ray.artifacts.checkpoints_on_disk import newest_verified
from tim_ray.tracking import RESTARTED_FROM_TAG

NAME = "stops"
OVERRIDES = ["model.arch=tim-tiny", "model.conditioning=class", "data.max_samples=4096", "data.height=16",
             "data.width=16", "train.batch_size=8", "train.log_every=1", "train.eval_every=100000",
             "checkpoint.every=4", "checkpoint.stop_check_every=1", "eval.nfe=[1]", f"train.name={NAME}"]
LONG = "train.steps=100000"  # a run that is stopped long before its end


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    work = tmp_path_factory.mktemp("stops")
    ray_tmp = tempfile.mkdtemp(prefix="ts-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    gcs, dashboard, client, agent = _free_ports(4)
    # The venv's bin first on PATH: a submitted job finds `tim-ray` on the PATH Ray was started with.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    argv = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--num-cpus=8", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--temp-dir={ray_tmp}",
            "--object-store-memory=536870912", "--disable-usage-stats"]
    log = work / "ray_start.log"
    started = []
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc.pid)
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version",
                   {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}, "the Ray job server", proc, log)
        yield {"env": env, "work": work, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}",
               "session": proc.pid}
    finally:
        _stop_sessions(*started)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _events(run_dir: Path) -> list[dict]:
    path, events = run_dir / "events.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return events


def _starts(run_dir: Path) -> list[int]:
    return [e["step"] for e in _events(run_dir) if e["event"] == "start"]


def _last_step(run_dir: Path) -> int:
    """The last step the current launch logged (-1 before it logs one)."""
    events = _events(run_dir)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    return max((e["step"] for e in events[starts[-1] if starts else 0:] if e["event"] == "metrics"), default=-1)


def _newest_step(run_dir: Path) -> int | None:
    """The step of the newest complete and verified checkpoint on disk (the rule every launch must follow)."""
    found = newest_verified(run_dir)
    return int(found.name.split("_")[1].split("-")[0]) if found else None


def _wait_for(what: str, done, alive=lambda: True, timeout_s: float = 300, explain=lambda: ""):
    deadline = time.time() + timeout_s
    while not done():
        assert alive(), f"ended before {what}: {explain()}"
        assert time.time() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def _driver_pid(out: Path) -> int:
    """The `tim-ray train` process writing under `out` (the job's driver: jobs/*.sh exec it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")
        except OSError:
            continue
        if f"train.output_dir={out}" in argv and any(a.endswith("/tim-ray") for a in argv[:2]):
            return int(cmdline.parent.name)
    raise AssertionError(f"no tim-ray driver for {out}")


def _train_workers(session: int) -> list[int]:
    """The live Ray Train worker processes of the `ray start` session `session` (its raylet forks them; Ray sets
    their process title, argv[0], to `ray::RayTrainWorker` or `ray::RayTrainWorker.<method>`)."""
    found = []
    for pid in _session_pids(session):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.split(".")[0].strip() == "ray::RayTrainWorker" and not _is_zombie(pid):
            found.append(pid)
    return found


def _job(head: dict, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address HEAD ARGS...`, as a user types it."""
    line = " ".join(["ray", "job", command, "--address", head["dashboard"], *args])
    return _run(line, head["env"], timeout=timeout)


def _job_api(head: dict, path: str) -> dict:
    """GET the job server's REST API (what the CLI calls, without a Python start per call on a loaded machine)."""
    request = urllib.request.Request(f"{head['dashboard']}/api/jobs/{path}",
                                     headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _job_status(head: dict, submission_id: str) -> str:
    return _job_api(head, submission_id)["status"]


def _job_logs(head: dict, submission_id: str) -> str:
    return _job_api(head, f"{submission_id}/logs")["logs"]


@pytest.mark.ray
def test_every_driver_stop_resumes_from_the_newest_checkpoint_and_links_the_mlflow_runs(head):
    from mlflow.tracking import MlflowClient

    out = head["work"] / "runs"
    run_dir = out / NAME
    overrides = [*OVERRIDES, f"train.output_dir={out}"]
    submit = ["--runtime-env", "jobs/runtime_env.yaml", "--no-wait", "--submission-id"]
    job = " ".join(["--", "bash", "jobs/quickstart.sh", *overrides, LONG])
    assert yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]
    measured = []

    # 1. `ray job stop` of the submitted job: the stop's checkpoint is written and registered, the job STOPPED.
    assert _job(head, "submit", *submit, "stop-1", job).returncode == 0
    _wait_for("step 3 of job 1", lambda: _last_step(run_dir) >= 3, lambda: _job_status(head, "stop-1") != "FAILED",
              explain=lambda: _job_logs(head, "stop-1")[-5000:])
    signalled = time.time()
    stop = _job(head, "stop", "stop-1", timeout=200)  # waits for the job to end
    stopped_in = time.time() - signalled
    logs = _job_logs(head, "stop-1")
    assert stop.returncode == 0 and _job_status(head, "stop-1") == "STOPPED", stop.stdout + stop.stderr
    (line,) = [x for x in logs.splitlines() if x.startswith("tim-ray train: stopped at step")]
    step = int(line.split()[5])
    assert "stop requested" in line and _newest_step(run_dir) == step, logs[-3000:]
    assert "RAY_JOB_STOP_WAIT_TIME_S is not set" not in logs
    # Where the time went: the CLI's own start, the workers' stop (the finish event), the driver's exit (end_time).
    (finished,) = [e["time"] for e in _events(run_dir) if e["event"] == "finish"]
    ended = _job_api(head, "stop-1")["end_time"] / 1000
    measured.append(f"ray job stop -> checkpoint at step {step}; job STOPPED {stopped_in:.1f} s after the CLI started "
                    f"(workers done at {finished - signalled:.1f} s, driver gone at {ended - signalled:.1f} s)")

    # 2. The resubmitted job starts at that step; its driver is SIGKILLed after its next periodic checkpoint.
    assert _job(head, "submit", *submit, "stop-2", job).returncode == 0

    def running() -> bool:
        return _job_status(head, "stop-2") != "FAILED"

    def logs() -> str:
        return _job_logs(head, "stop-2")[-5000:]

    _wait_for("job 2's start", lambda: len(_starts(run_dir)) == 2, running, explain=logs)
    assert _starts(run_dir)[1] == step, "resubmitted job did not start at the stop's checkpoint"
    periodic = (step // 4 + 1) * 4
    _wait_for(f"job 2's checkpoint at step {periodic}", lambda: (_newest_step(run_dir) or 0) >= periodic, running,
              explain=logs)
    _wait_for("a step past it", lambda: _last_step(run_dir) > periodic + 1, running, explain=logs)
    os.kill(_driver_pid(out), signal.SIGKILL)
    _wait_for("job 2 to fail", lambda: _job_status(head, "stop-2") == "FAILED", timeout_s=120)
    time.sleep(3)  # its workers die with their owner; let any checkpoint copy in flight land or stop
    # Job 1's driver closed its own run (it exited within the stop's wait): nothing was left RUNNING.
    full = _job_logs(head, "stop-2")
    assert "restarted from run " in full and "(was still RUNNING)" not in full, full[-5000:]
    step = _newest_step(run_dir)
    measured.append(f"SIGKILL of the driver at step {_last_step(run_dir)} -> newest verified checkpoint {step}")

    # 3. `tim-ray train` in a shell against the head starts there; its worker is SIGKILLed as soon as its next
    # periodic checkpoint verifies (Ray may not have registered it yet) and Ray restarts the group there; then
    # SIGTERM: checkpoint at the step it is on, exit 0.
    argv = [os.path.join(VENV_BIN, "tim-ray"), "train", "configs/quickstart.toml", *overrides, LONG]
    env = {**head["env"], "RAY_ADDRESS": head["gcs"], "PYTHONUNBUFFERED": "1"}
    shell_log = head["work"] / "launch3.log"  # a file, not a pipe: nothing blocks the driver's prints
    with open(shell_log, "w") as sink:
        shell = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def alive() -> bool:
        return shell.poll() is None

    def shell_output() -> str:
        return shell_log.read_text(errors="replace")[-5000:]

    _wait_for("launch 3's start", lambda: len(_starts(run_dir)) == 3, alive, explain=shell_output)
    assert _starts(run_dir)[2] == step, f"started at {_starts(run_dir)[2]}, newest verified checkpoint {step}"
    periodic = (step // 4 + 1) * 4
    _wait_for(f"launch 3's checkpoint at step {periodic}", lambda: (_newest_step(run_dir) or 0) >= periodic, alive,
              explain=shell_output)
    (worker,) = _train_workers(head["session"])  # ray.num_workers = 1
    os.kill(worker, signal.SIGKILL)
    killed, killed_after = time.time(), _last_step(run_dir)
    # Its checkpoint uploads ran in the killed process: what is verified on disk now is all there will be.
    step = _newest_step(run_dir)
    _wait_for("the restarted worker group", lambda: len(_starts(run_dir)) == 4, alive, explain=shell_output)
    assert _starts(run_dir)[3] == step, f"restarted at {_starts(run_dir)[3]}, newest verified checkpoint {step}"
    assert worker not in _train_workers(head["session"])
    restarted = [e["time"] for e in _events(run_dir) if e["event"] == "start"][3]
    measured.append(f"SIGKILL of the worker after step {killed_after} -> the group restarted at the newest verified "
                    f"checkpoint {step}, {restarted - killed:.1f} s after the kill")
    _wait_for("a step past it", lambda: _last_step(run_dir) > step + 1, alive, explain=shell_output)
    signalled = time.time()
    shell.send_signal(signal.SIGTERM)
    shell.wait(timeout=200)
    output = shell_log.read_text(errors="replace")
    assert shell.returncode == 0, output[-3000:]
    assert "restarted from run" in output and "KILLED (was still RUNNING)" in output, output[-3000:]
    (line,) = [x for x in output.splitlines() if x.startswith("tim-ray train: stopped at step")]
    step = int(line.split()[5])
    assert _newest_step(run_dir) == step
    measured.append(f"SIGTERM of the driver -> checkpoint at step {step}, exit 0 in {time.time() - signalled:.1f} s")

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tim-ray").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "KILLED"]
    assert [r.data.tags.get(RESTARTED_FROM_TAG) for r in runs] == [None] + [r.info.run_id for r in runs[:-1]]
    assert (run_dir / "mlflow_run_id").read_text() == runs[-1].info.run_id
    print("\n" + "\n".join(measured))


def test_a_launch_closes_only_a_run_left_running_and_links_any_earlier_one(tmp_path):
    """Tracker.for_launch on a real sqlite store, without Ray: a run left RUNNING is closed as KILLED; a run that
    ended keeps its status; a recorded id the store does not know (tracking.uri changed) is named, not fatal."""
    from mlflow.tracking import MlflowClient

    from tim_ray.config import load_config
    from tim_ray.tracking import RUN_ID_FILE, Tracker

    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    first = Tracker.for_launch(cfg, tmp_path)  # its driver "dies": the run stays RUNNING
    second = Tracker.for_launch(cfg, tmp_path)
    assert (second.previous_run_id, second.previous_status) == (first.run_id, "KILLED (was still RUNNING)")
    second.finish()
    third = Tracker.for_launch(cfg, tmp_path)
    assert (third.previous_run_id, third.previous_status) == (second.run_id, "FINISHED")
    client = MlflowClient(tracking_uri=third.uri)
    assert [client.get_run(t.run_id).info.status for t in (first, second, third)] == ["KILLED", "FINISHED", "RUNNING"]
    assert client.get_run(third.run_id).data.tags[RESTARTED_FROM_TAG] == second.run_id

    (tmp_path / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef")
    fourth = Tracker.for_launch(cfg, tmp_path)
    assert fourth.previous_status.startswith(f"not found in {fourth.uri}") and "\n" not in fourth.previous_status
