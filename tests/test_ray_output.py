"""What train, tune and precompute show of Ray's output, set in one place (start_ray -> tim_ray.ray_output): by
default only tim-ray's own lines, those a worker prints included (a Tune trial's progress lines travel that way),
and none of Ray's: neither a worker's other output nor what reaches the driver on the cluster's error channel as
"(raylet) ..." (which log_to_driver=False does not stop); with --verbose all of it, as Ray prints it.

A real local Ray in a subprocess per mode (a fresh driver, as the commands have): a task prints a line of its own,
a tim-ray line, and pushes a message onto the error channel, the way a raylet's "N PYTHON worker processes have
been started" arrives."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.ray

DRIVER = r'''
import sys, time
import ray
from tim_ray.config import load_config
from tim_ray.train.launch import start_ray


class Tee:
    """sys.stdout that also keeps what was written: the driver waits until the lines it expects arrived."""
    def __init__(self, out):
        self.out, self.text = out, ""
    def write(self, s):
        self.text += s
        return self.out.write(s)
    def flush(self):
        self.out.flush()


verbose = sys.argv[1] == "verbose"
print(start_ray(load_config(None, ["ray.local_num_cpus=2"]), None, verbose), flush=True)
sys.stdout = tee = Tee(sys.stdout)


@ray.remote
def talk():
    from ray._private.utils import push_error_to_driver
    print("ray-noise from a worker", flush=True)
    print("[tim-ray] a line of tim-ray's", file=sys.__stdout__, flush=True)
    push_error_to_driver(ray._private.worker.global_worker, "test", "raylet-noise on the error channel")


ray.get(talk.remote())
expected = ["[tim-ray] a line", "ray-noise", "raylet-noise"] if verbose else ["[tim-ray] a line"]
deadline = time.monotonic() + 60
while not all(e in tee.text for e in expected) and time.monotonic() < deadline:
    time.sleep(0.2)
time.sleep(2)  # what should not come has had its time to come
sys.stdout = tee.out
ray.shutdown()
'''


def _run(mode: str) -> tuple[str, str]:
    temp = tempfile.mkdtemp(prefix="tr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": temp}
        out = subprocess.run([sys.executable, "-c", DRIVER, mode], capture_output=True, text=True, timeout=300,
                             env=env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stderr


def test_quiet_by_default_keeps_tim_ray_worker_lines_and_drops_ray_and_raylet_output():
    out, err = _run("quiet")
    assert "\n[tim-ray] a line of tim-ray's\n" in out, out  # without Ray's "(talk pid=...)" prefix
    shown = out + err
    for noise in ("ray-noise", "raylet-noise", "(raylet)", "(pid=", "(talk pid=", " INFO "):
        assert noise not in shown, f"{noise!r} in the output:\n{shown}"


def test_verbose_shows_rays_output_as_ray_prints_it():
    out, err = _run("verbose")
    shown = out + err
    assert "ray-noise from a worker" in shown and "(raylet)" in shown and "raylet-noise" in shown, shown
    assert "[tim-ray] a line of tim-ray's" in shown, shown


def test_a_worker_line_without_a_run_control_names_its_run(capfd):
    """A sweep's trials print their own lines side by side (no RunControl): each says which run it is from."""
    from tim_ray.train.stop import tell_driver

    tell_driver(None, "step 3/10 (30%)", "sweep_1a2b3c")
    assert capfd.readouterr().out == "[tim-ray] sweep_1a2b3c: step 3/10 (30%)\n"
