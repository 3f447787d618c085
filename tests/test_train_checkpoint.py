"""Checkpoint selection and damage, without Ray: which checkpoint a resume picks, and the errors for broken ones."""
import json
import pickle

import pytest
import torch
from eval_fixtures import CodeRunningPickle

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import CheckpointError, TrainState, load_weights, read_state, save_checkpoint
from tim_ray.config import load_config
from tim_ray.models.registry import build_model
from tim_ray.train.faults import Faults, FaultSpecError
from tim_ray.train.launch import RAY_SNAPSHOT, ResumeError, latest_checkpoint, resolve_resume


def tiny(tmp_path):
    return load_config(None, ["model.arch=tim-tiny", "model.conditioning=class", f"train.output_dir={tmp_path}",
                              "train.name=run"])


def write_checkpoint(directory, cfg, step: int) -> torch.nn.Module:
    model = build_model(cfg.model, in_channels=1, text_dim=None)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(str(directory), model, optimizer, None, TrainState(step=step), {}, rank=0)
    return model


def register(run, *names):
    """What Ray's checkpoint manager writes once every rank's files of a checkpoint are persisted."""
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}))


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    cfg = tiny(tmp_path)
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoint_00000004", cfg, 4)
    # A crash while step 8 was being persisted: its directory exists, with state.json, but not every file arrived.
    write_checkpoint(run / "checkpoint_00000008", cfg, 8)
    (run / "checkpoint_00000008" / "dcp" / ".metadata").unlink()
    register(run, "checkpoint_00000004")
    assert latest_checkpoint(cfg) == str(run / "checkpoint_00000004")
    assert resolve_resume(cfg, "auto") is None  # the worker finds the newest verified one itself
    with pytest.raises(ResumeError, match="already has checkpoints"):
        resolve_resume(cfg, "never")


def test_a_damaged_snapshot_or_checkpoint_gives_one_clear_error(tmp_path):
    cfg = tiny(tmp_path)
    run = tmp_path / "run"
    model = write_checkpoint(run / "checkpoint_00000004", cfg, 4)
    (run / RAY_SNAPSHOT).write_text("{not json")
    with pytest.raises(ResumeError, match="corrupt"):
        resolve_resume(cfg, "auto")

    checkpoint = run / "checkpoint_00000004"
    assert load_weights(str(checkpoint), build_model(cfg.model, in_channels=1, text_dim=None)).step == 4
    (run / RAY_SNAPSHOT).unlink()
    (checkpoint / "state.json").write_text('{"state": {"step": ')
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        read_state(str(checkpoint))
    with pytest.raises(CheckpointError, match=r"checkpoint_00000004/state.json: \d+ bytes, expected"):
        resolve_resume(cfg, str(checkpoint))
    with pytest.raises(ResumeError, match="not a tim-ray checkpoint directory"):
        resolve_resume(cfg, str(run))

    (checkpoint / "state.json").write_text(json.dumps({"state": {"step": 4}, "config": {}}))
    shard = checkpoint / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=r"dcp/__0_0.distcp: 64 bytes, expected \d+ \(truncated or changed\)"):
        load_weights(str(checkpoint), model)


def test_fault_specs_parse_and_bad_ones_name_the_entry():
    faults = Faults.parse("crash@7:1, nan@5-9,nan@2")
    assert faults.crashes == ((7, 1),) and faults.nan_steps == ((5, 9), (2, 2))
    batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2)}
    assert torch.isnan(faults.batch(batch, 7)["image"]).all() and faults.batch(batch, 4) is batch
    assert not Faults.parse("")
    with pytest.raises(FaultSpecError, match="'boom@3'"):
        Faults.parse("crash@1,boom@3")


def test_a_crafted_index_is_refused_before_it_runs_anything(tmp_path):
    cfg = tiny(tmp_path)
    checkpoint = tmp_path / "ckpt"
    model = write_checkpoint(checkpoint, cfg, 4)
    witness = tmp_path / "code-ran"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(CodeRunningPickle(str(witness))))
    with pytest.raises(CheckpointError, match="sha256 mismatch|expected"):  # the checksums catch it first
        load_weights(str(checkpoint), model)
    checksums.seal(checkpoint, "checksums.rank0.json")  # a crafter who rewrites the checksums too
    with pytest.raises(CheckpointError, match="refusing"):
        load_weights(str(checkpoint), model)
    assert not witness.exists()


def test_a_world_of_one_saves_and_loads_without_collectives(tmp_path, monkeypatch):
    """DCP's plan gather at world size 1 left an OpenMP team on gloo's thread that slowed every later CPU step
    (see tim_ray.artifacts.checkpoint._alone): a world of one must save and load without any collective."""
    import torch.distributed as dist

    from tim_ray.artifacts.checkpoint import load_checkpoint
    from tim_ray.train.parallelize import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = tiny(tmp_path)
        model = build_model(cfg.model, in_channels=1, text_dim=None)
        shard_model(model, torch.device("cpu"), 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sum(p.sum() for p in model.parameters()).backward()
        optimizer.step()
        saved = {name: p.full_tensor().clone() for name, p in model.named_parameters()}

        def refuse(*args, **kwargs):
            raise AssertionError("a collective at world size 1")

        for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                     "all_gather", "all_reduce", "broadcast", "barrier"):
            monkeypatch.setattr(dist, name, refuse)
        save_checkpoint(str(tmp_path / "ckpt"), model, optimizer, None, TrainState(step=3), {}, rank=0)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        assert load_checkpoint(str(tmp_path / "ckpt"), model, optimizer, None).step == 3
        for name, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), saved[name]), name
        assert optimizer.state_dict()["state"], "the optimizer moments were not restored"
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
