"""SIGTERM to `tim-ray train` (what `kill`, Ctrl-C or `ray job stop` send): the workers save a checkpoint at the
step they are on, the command exits 0, and running it again continues from there."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray


def test_sigterm_checkpoints_the_current_step_then_the_same_command_resumes(tmp_path):
    args = [sys.executable, "-m", "tim_ray.cli", "train", "model.arch=tim-tiny", "model.conditioning=class",
            "data.max_samples=4096", "data.height=16", "data.width=16", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=100000", "checkpoint.every=100000", "checkpoint.stop_check_every=1",
            "eval.nfe=[1]", f"train.output_dir={tmp_path}", "train.name=stopped"]
    events = tmp_path / "stopped" / "events.jsonl"
    train = subprocess.Popen([*args, "train.steps=400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not (events.is_file() and '"step": 3,' in events.read_text()):
        assert train.poll() is None and time.time() < deadline, "training did not reach step 3"
        time.sleep(0.2)
    train.send_signal(signal.SIGTERM)
    signalled = time.time()
    output, _ = train.communicate(timeout=180)
    exited = time.time()
    assert train.returncode == 0, output
    stopped = [line for line in output.splitlines() if line.startswith("tim-ray train: stopped at step")]
    assert stopped and "stop requested" in stopped[0], output
    step = int(stopped[0].split()[5])
    assert step >= 3 and (tmp_path / "stopped" / f"checkpoint_{step:08d}" / "state.json").is_file()

    resumed = subprocess.run([*args, f"train.steps={step + 2}"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    starts = [json.loads(line) for line in events.read_text().splitlines() if '"event": "start"' in line]
    assert [s["step"] for s in starts] == [0, step]
    print(f"\nSIGTERM -> checkpoint at step {step} (0 steps lost) and exit 0 in {exited - signalled:.1f} s")
