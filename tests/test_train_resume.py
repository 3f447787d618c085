"""Never lose work, on a real local Ray with 2 FSDP2 workers (CPU, gloo): a worker killed mid-run, a stop and a
relaunch, NaN steps, a corrupt checkpoint, --resume PATH over Ray's registered checkpoint. Faults come from
TIM_RAY_INJECT_FAULTS (tim_ray/train/faults.py).

The data is a parquet corpus with broken rows, streamed: an epoch ends at step 6, so the runs cross an epoch
boundary and meet rejects before and after each interruption. The reference is one uninterrupted run; the
interrupted runs must end with bit-identical parameters and EMA (`torch.equal`), must have trained on exactly the
same samples at every step, and must record each rejected row once, whatever was redone.
"""
import json
import shutil
from collections import defaultdict
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tim_ray.artifacts.checkpoint import load_weights, read_state
from tim_ray.config import load_config
from tim_ray.data import open_training_data
from tim_ray.models.registry import build_model
from tim_ray.train.faults import ENV_VAR
from tim_ray.train.launch import RAY_SNAPSHOT, latest_checkpoint, launch

pytestmark = pytest.mark.ray

STEPS = 8
ROWS = 100  # 6 global batches of 16 an epoch
CORPUS = "corpus"


def broken(row: int) -> str:
    """The reject reason of corpus row `row`, or "" for a good row."""
    return "truncated_image" if row % 9 == 4 else "empty_caption" if row % 13 == 7 else ""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two parquet files of ROWS 16x16 PNGs (row groups of 10) with labels; 17 rows broken."""
    root = tmp_path_factory.mktemp("data") / CORPUS
    root.mkdir()
    images, captions = [], []
    for row in range(ROWS):
        png = fx.encoded(16, 16, "PNG", seed=row)
        images.append(png[:len(png) // 2] if broken(row) == "truncated_image" else png)
        captions.append("  " if broken(row) == "empty_caption" else f"row {row}")
    for part in range(2):
        rows = slice(part * ROWS // 2, (part + 1) * ROWS // 2)
        pq.write_table(pa.table({"image": images[rows], "caption": captions[rows],
                                 "label": [r % 10 for r in range(ROWS)][rows]}),
                       root / f"part-{part}.parquet", row_group_size=10)
    return root


def tiny(corpus: Path, tmp_path: Path, name: str, *extra: str):
    return load_config(None, [
        "model.arch=tim-tiny", "model.conditioning=class", "data.source=parquet", f"data.path='{corpus}'",
        "data.shuffle_window=40", "data.height=16", "data.width=16", "ray.num_workers=2", "train.batch_size=8",
        f"train.steps={STEPS}",
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
def reference(local_ray, corpus, tmp_path_factory):
    """The uninterrupted run."""
    cfg = tiny(corpus, tmp_path_factory.mktemp("reference"), "reference")
    assert launch(cfg) == 0
    return cfg


def weights(cfg, use_ema: bool) -> dict[str, torch.Tensor]:
    model = build_model(cfg.model, in_channels=3, text_dim=None)
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
    first_epoch = [i for step, ids in steps.items() if step < ROWS // 16 for i in ids]
    assert len(first_epoch) == len(set(first_epoch)), "a sample was consumed twice in an epoch"
    assert_rejects_recorded_once(cfg)


def assert_rejects_recorded_once(cfg) -> None:
    """The rejects file lists each broken row of the first epoch's 6 batches once, with its reason, whatever was
    redone; every report of that epoch's count (one per worker group that finished the epoch) says the same."""
    layout = open_training_data(cfg).layout(0)
    units, rows = layout.source_rows(np.arange(ROWS // 16 * 16))
    met = {f"part-{u // 5}.parquet#{(u % 5) * 10 + r}": broken(u * 10 + r) for u, r in zip(units, rows)}
    expected = {key: reason for key, reason in met.items() if reason}
    run = Path(cfg.train.output_dir) / cfg.train.name
    records = [json.loads(line) for line in (run / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in records} == expected and len(records) == len(expected) > 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    totals = {e["rejected"] for e in events if e["event"] == "epoch_rejects" and e["epoch"] == 0}
    assert totals == {len(expected)}, totals


def test_worker_killed_mid_run_resumes_bit_exactly(reference, corpus, tmp_path, monkeypatch):
    cfg = tiny(corpus, tmp_path, "killed")
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


def test_stopped_run_relaunched_resumes_bit_exactly(reference, corpus, tmp_path, capsys):
    assert launch(tiny(corpus, tmp_path, "relaunched", f"train.steps={STEPS // 2}")) == 0
    cfg = tiny(corpus, tmp_path, "relaunched")
    assert read_state(latest_checkpoint(cfg))[0].step == STEPS // 2
    assert launch(cfg) == 0
    assert_same_training(cfg, reference)

    # A flipped bit in rank 1's shard of the newest checkpoint, which Ray registered: the run resumes from the
    # verified checkpoint before it, and its new step-8 checkpoint goes beside the damaged one, not into it.
    latest = Path(latest_checkpoint(cfg))
    assert latest.name == "checkpoint_00000008"
    shard = latest / "dcp" / "__1_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    shard.write_bytes(bytes(damaged))
    assert launch(tiny(corpus, tmp_path, "relaunched", f"train.steps={STEPS + 2}")) == 0
    assert starts(cfg)[-1] == STEPS // 2, "did not fall back to the step-4 checkpoint"
    assert read_state(latest_checkpoint(cfg))[0].step == STEPS + 2
    assert (latest.parent / "checkpoint_00000008-2").is_dir() and shard.read_bytes() == bytes(damaged)

    # Moving the damaged checkpoint away (Ray still registers it): no traceback, the run continues.
    shutil.move(latest, tmp_path / "damaged")
    capsys.readouterr()
    assert launch(tiny(corpus, tmp_path, "relaunched", f"train.steps={STEPS + 4}")) == 0
    assert f"Ray's checkpoint registry names {latest.name}, which is gone" in capsys.readouterr().out
    assert starts(cfg)[-1] == STEPS + 2 and read_state(latest_checkpoint(cfg))[0].step == STEPS + 4


def starts(cfg) -> list[int]:
    """The step each worker group of the run started at, in order."""
    events = (Path(cfg.train.output_dir) / cfg.train.name / "events.jsonl").read_text().splitlines()
    return [e["step"] for e in map(json.loads, events) if e["event"] == "start"]


def test_an_explicit_resume_path_wins_over_rays_checkpoint_until_this_launch_writes_one(reference, corpus, tmp_path,
                                                                                       monkeypatch):
    """A run whose Ray registry ends at step 8, launched with --resume <its step-4 checkpoint>: the first worker
    group starts at 4. Rank 1 dies at step 10, after this launch's own step-8 checkpoint: the restarted group
    continues from that one (step 8), not from PATH again."""
    source = Path(reference.train.output_dir) / reference.train.name
    run = tmp_path / "explicit"
    run.mkdir()
    for name in ("checkpoint_00000004", "checkpoint_00000008"):
        shutil.copytree(source / name, run / name)
    shutil.copy(source / RAY_SNAPSHOT, run / RAY_SNAPSHOT)
    cfg = tiny(corpus, tmp_path, "explicit", "train.steps=12")
    monkeypatch.setenv(ENV_VAR, "crash@10:1")
    assert launch(cfg, resume=str(run / "checkpoint_00000004")) == 0
    assert (run / "faults" / "crash@10:1").is_file()
    assert starts(cfg) == [4, 8]
    assert read_state(latest_checkpoint(cfg))[0].step == 12
    # From PATH (step 4) to this launch's step 8 is the reference's own trajectory, bit for bit.
    ours, theirs = (build_model(cfg.model, in_channels=3, text_dim=None) for _ in range(2))
    load_weights(str(run / "checkpoint_00000008-2"), ours)
    load_weights(str(source / "checkpoint_00000008"), theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_nan_steps_are_skipped_and_persistent_nan_stops_at_the_last_good_checkpoint(local_ray, corpus, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "nan@1,nan@5-99")
    cfg = tiny(corpus, tmp_path, "nonfinite", "train.max_nonfinite_steps=2")
    assert launch(cfg) == 1
    assert "3 consecutive steps had a non-finite loss" in capsys.readouterr().err
    assert read_state(latest_checkpoint(cfg))[0].step == 4
    events = [json.loads(line) for line in (tmp_path / "nonfinite" / "events.jsonl").read_text().splitlines()]
    skipped = {e["step"]: e["skipped_steps"] for e in events if e["event"] == "metrics"}
    assert skipped[2] == 1 and skipped[4] == 0, skipped
