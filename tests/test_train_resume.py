"""Never lose work, on a real local Ray with 2 FSDP2 workers (CPU, gloo): a worker killed mid-run, a stop and a
relaunch, NaN steps, a corrupt checkpoint. Faults come from TIM_RAY_INJECT_FAULTS (tim_ray/train/faults.py).

The reference is one uninterrupted run; the interrupted runs must end with bit-identical parameters and EMA
(`torch.equal`) and must have trained on exactly the same samples at every step.
"""
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tim_ray.config import load_config
from tim_ray.models.registry import build_model
from tim_ray.train.checkpoint import load_weights, read_state
from tim_ray.train.faults import ENV_VAR
from tim_ray.train.launch import latest_checkpoint, launch

pytestmark = pytest.mark.ray

STEPS = 8


def tiny(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [
        "model.arch=tim-tiny", "model.conditioning=class", "data.source=fashion-mnist", "data.max_samples=256",
        "data.height=16", "data.width=16", "ray.num_workers=2", "train.batch_size=8", f"train.steps={STEPS}",
        "train.log_every=2", "train.eval_every=100", "checkpoint.every=4", "checkpoint.stop_check_every=1",
        "train.sample_log=true", "eval.nfe=[1]", f"train.output_dir={tmp_path}", f"train.name={name}", *extra])


@pytest.fixture(scope="module")
def local_ray():
    """Ray collects a reported checkpoint at its next health check (every 2 s by default); a worker that dies
    before then takes the report with it and the group restarts from the checkpoint before. These steps take
    ~0.1 s, so the test checks health every 0.1 s (docs/reliability.md)."""
    import os

    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(num_cpus=8, log_to_driver=False)
    yield
    ray.shutdown()
    del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    """The uninterrupted run."""
    cfg = tiny(tmp_path_factory.mktemp("reference"), "reference")
    assert launch(cfg) == 0
    return cfg


def weights(cfg, use_ema: bool) -> dict[str, torch.Tensor]:
    model = build_model(cfg.model, in_channels=1, text_dim=None)
    state = load_weights(latest_checkpoint(cfg), model, use_ema=use_ema)
    assert state.step == STEPS
    return {name: p.detach() for name, p in model.named_parameters()}


def consumed(cfg) -> dict[int, list[int]]:
    """step -> sorted sample ids over all ranks, from the last worker group that ran the step (a group restarted
    from a checkpoint redoes the steps after it; those redone steps are the ones that count)."""
    latest: dict[int, int] = {}
    ids: dict[tuple[int, int], list[int]] = defaultdict(list)
    for path in sorted((Path(cfg.train.output_dir) / cfg.train.name / "samples_consumed").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest[row["step"]] = max(latest.get(row["step"], -1), row["attempt"])
            ids[row["step"], row["attempt"]] += row["ids"]
    return {step: sorted(ids[step, attempt]) for step, attempt in sorted(latest.items())}


def assert_same_training(cfg, reference) -> None:
    for use_ema in (False, True):
        ours, theirs = weights(cfg, use_ema), weights(reference, use_ema)
        unequal = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
        assert not unequal, f"{'EMA ' if use_ema else ''}tensors differ after resuming: {unequal[:5]}"
    steps = consumed(cfg)
    assert steps == consumed(reference) and sorted(steps) == list(range(STEPS))
    every_id = [i for ids in steps.values() for i in ids]
    assert len(every_id) == len(set(every_id)) == STEPS * 16, "a sample was consumed twice or skipped"


def test_worker_killed_mid_run_resumes_bit_exactly(reference, tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "killed")
    monkeypatch.setenv(ENV_VAR, "crash@7:1")  # rank 1 dies at step 7; the last checkpoint is step 4
    assert launch(cfg) == 0
    assert (tmp_path / "killed" / "faults" / "crash@7:1").is_file()
    attempts = {json.loads(line)["attempt"]
                for line in (tmp_path / "killed" / "samples_consumed" / "rank1.jsonl").read_text().splitlines()}
    assert attempts == {0, 4}, "the group did not restart from the step-4 checkpoint"
    assert_same_training(cfg, reference)
    events = [json.loads(line) for line in (tmp_path / "killed" / "events.jsonl").read_text().splitlines()]
    restart = [e for e in events if e["event"] == "start"][1]
    before = max(e["time"] for e in events if e["time"] < restart["time"])
    print(f"\nkilled rank 1 at step 7: restarted from step {restart['step']} (3 steps redone), "
          f"{restart['time'] - before:.1f} s from the last event before the crash to the restart")


def test_stopped_run_relaunched_resumes_bit_exactly(reference, tmp_path, capsys):
    assert launch(tiny(tmp_path, "relaunched", f"train.steps={STEPS // 2}")) == 0
    cfg = tiny(tmp_path, "relaunched")
    assert read_state(latest_checkpoint(cfg))[0].step == STEPS // 2
    assert launch(cfg) == 0
    assert_same_training(cfg, reference)

    # A checkpoint whose shard is damaged: a one-line error naming it, exit 1, no retries.
    latest = Path(latest_checkpoint(cfg))
    shard = latest / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert launch(tiny(tmp_path, "relaunched", f"train.steps={STEPS + 2}")) == 1
    assert f"stopped at step 0: cannot load {latest}" in capsys.readouterr().err


def test_nan_steps_are_skipped_and_persistent_nan_stops_at_the_last_good_checkpoint(local_ray, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "nan@1,nan@5-99")
    cfg = tiny(tmp_path, "nonfinite", "train.max_nonfinite_steps=2")
    assert launch(cfg) == 1
    assert "3 consecutive steps had a non-finite loss" in capsys.readouterr().err
    assert read_state(latest_checkpoint(cfg))[0].step == 4
    events = [json.loads(line) for line in (tmp_path / "nonfinite" / "events.jsonl").read_text().splitlines()]
    skipped = {e["step"]: e["skipped_steps"] for e in events if e["event"] == "metrics"}
    assert skipped[2] == 1 and skipped[4] == 0, skipped
