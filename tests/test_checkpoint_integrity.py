"""Never trust a file: checksum manifests on checkpoints and exports, verified before every load, and the one rule
for which checkpoint train (resume), sample, eval and export use. Plain torch, no Ray."""
import json
import shutil
import warnings

import pytest
import torch
from eval_fixtures import tiny_config, write_checkpoint

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import CheckpointError, TrainState, load_weights, save_checkpoint
from tim_ray.artifacts.checkpoints_on_disk import checkpoint_dirs, newest_verified, resume_point
from tim_ray.cli import main
from tim_ray.config import load_config, to_dict
from tim_ray.models.registry import build_model
from tim_ray.train.launch import RAY_SNAPSHOT, latest_checkpoint, resolve_resume, set_aside_stale_registry

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x10
    path.write_bytes(bytes(data))


def one_line(err: str) -> str:
    assert err.startswith("tim-ray: error: ") and err.count("\n") == 1, err
    return err


def test_a_flipped_bit_in_a_shard_is_an_error_naming_the_file(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checksums.rank0.json", "dcp", "state.json"]
    manifest = json.loads((checkpoint / "checksums.rank0.json").read_text())
    assert manifest["part"] == 0 and manifest["parts"] == 1
    assert sorted(manifest["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "state.json"]
    checksums.verify(checkpoint)

    shard = checkpoint / "dcp" / "__0_0.distcp"
    flip_bit(shard)
    with pytest.raises(CheckpointError) as info:
        checksums.verify(checkpoint)
    assert str(info.value) == f"{shard}: sha256 mismatch (file changed or corrupt)"
    model = build_model(tiny_config().model, in_channels=1, text_dim=None)
    with pytest.raises(CheckpointError, match="__0_0.distcp: sha256 mismatch"):
        load_weights(str(checkpoint), model)


def test_missing_files_parts_and_manifests_are_named(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    # What a second rank adds: its shard, then its own manifest (part 1 of 2); rank 0's says part 0 of 2.
    checksums.seal(checkpoint, "checksums.rank0.json", part=0, parts=2)
    shutil.copy(checkpoint / "dcp" / "__0_0.distcp", checkpoint / "dcp" / "__1_0.distcp")
    rank1 = checksums.manifest_bytes(checksums.describe(checkpoint, ["dcp/__1_0.distcp"]), part=1, parts=2)
    checksums.write_atomically(checkpoint / "checksums.rank1.json", rank1)
    checksums.verify(checkpoint)

    (checkpoint / "checksums.rank1.json").unlink()  # rank 1's files never arrived completely
    with pytest.raises(CheckpointError, match=r"the checksums of part\(s\) \[1\] of 2 are missing"):
        checksums.verify(checkpoint)
    (checkpoint / "checksums.rank1.json").write_bytes(rank1[:40])  # a manifest cut short
    with pytest.raises(CheckpointError, match="checksums.rank1.json: unreadable checksum manifest"):
        checksums.verify(checkpoint)
    (checkpoint / "checksums.rank1.json").write_bytes(rank1)
    (checkpoint / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"dcp/__1_0.distcp: missing \(incomplete, or moved away\)"):
        checksums.verify(checkpoint)

    escaping = checksums.manifest_bytes({"../outside": {"size": 1, "sha256": "0"}}, part=1, parts=2)
    checksums.write_atomically(checkpoint / "checksums.rank1.json", escaping)
    with pytest.raises(CheckpointError, match="lists '../outside', which is not inside"):
        checksums.verify(checkpoint)
    for manifest in checkpoint.glob("checksums*.json"):
        manifest.unlink()
    with pytest.raises(CheckpointError, match="no checksum manifest: incomplete .* not trusted"):
        checksums.verify(checkpoint)


def test_cli_export_refuses_a_damaged_checkpoint_with_exit_1(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run")
    flip_bit(checkpoint / "dcp" / "__0_0.distcp")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "e")]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{checkpoint / 'dcp' / '__0_0.distcp'}: sha256 mismatch (file changed or corrupt)" in err
    assert not (tmp_path / "e").exists()


def test_cli_sample_refuses_a_damaged_export_with_exit_1(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(write_checkpoint(tmp_path / "run")), "--out", str(out)]) == 0
    assert sorted(json.loads((out / "checksums.json").read_text())["files"]) == [
        "config.toml", "export.json", "model.safetensors"]
    args = ["sample", str(out), "--class", "1", "--nfe", "1"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    flip_bit(out / "model.safetensors")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{out / 'model.safetensors'}: sha256 mismatch (file changed or corrupt)" in err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def run_with_bad_newer_checkpoints(tmp_path_factory):
    """checkpoint 5 complete; 12 complete, then one bit of its shard flipped; 20 half-written (no manifest yet)."""
    run = tmp_path_factory.mktemp("out") / "run"
    write_checkpoint(run, step=5)
    flip_bit(write_checkpoint(run, step=12, seed=1) / "dcp" / "__0_0.distcp")
    (write_checkpoint(run, step=20, seed=2) / "checksums.rank0.json").unlink()
    return run


def assert_fell_back_to_step_5(err: str, run) -> None:
    lines = [line for line in err.splitlines() if line.startswith("tim-ray")]  # not MLflow's own lines
    assert len(lines) == 2, err
    assert lines[0].startswith("tim-ray: skipping checkpoint_00000020: ") and "no checksum manifest" in lines[0]
    assert lines[0].endswith("; using checkpoint_00000005")
    assert lines[1] == (f"tim-ray: skipping checkpoint_00000012: {run / 'checkpoint_00000012/dcp/__0_0.distcp'}: "
                        f"sha256 mismatch (file changed or corrupt); using checkpoint_00000005")


def test_export_of_a_run_dir_picks_the_newest_verified_checkpoint(run_with_bad_newer_checkpoints, tmp_path,
                                                                  capsys):
    run = run_with_bad_newer_checkpoints
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert "weights of step 5" in captured.out
    assert_fell_back_to_step_5(captured.err, run)
    info = json.loads((tmp_path / "e" / "export.json").read_text())
    assert info["state"]["step"] == 5 and info["source"] == str((run / "checkpoint_00000005").resolve())


def test_sample_of_a_run_dir_picks_the_newest_verified_checkpoint(run_with_bad_newer_checkpoints, tmp_path,
                                                                  capsys):
    run = run_with_bad_newer_checkpoints
    assert main(["sample", str(run), "--class", "1", "--nfe", "1", "--out", str(tmp_path / "s")]) == 0
    assert_fell_back_to_step_5(capsys.readouterr().err, run)
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["step"] == 5


def test_eval_of_a_run_dir_picks_the_newest_verified_checkpoint(run_with_bad_newer_checkpoints, tmp_path, capsys):
    run = run_with_bad_newer_checkpoints
    assert main(["eval", str(run), "--nfe", "1", "--metric", "consistency", "--num-samples", "4",
                 "--out", str(tmp_path / "v")]) == 0
    assert_fell_back_to_step_5(capsys.readouterr().err, run)
    assert json.loads((tmp_path / "v" / "eval.json").read_text())["step"] == 5


def test_train_resume_picks_the_newest_verified_checkpoint_too(run_with_bad_newer_checkpoints):
    run = run_with_bad_newer_checkpoints
    cfg = load_config(None, [f"train.output_dir={run.parent}", f"train.name={run.name}"])
    assert latest_checkpoint(cfg) == str(run / "checkpoint_00000005")
    notes = []
    assert resume_point(run, None, "this-launch", registered=True, note=notes.append) == str(
        run / "checkpoint_00000005")
    assert [n.split(":")[0] for n in notes] == ["skipping checkpoint_00000020", "skipping checkpoint_00000012"]


def test_a_run_dir_whose_checkpoints_all_fail_is_one_line_exit_1(tmp_path, capsys):
    run = tmp_path / "run"
    flip_bit(write_checkpoint(run, step=4) / "state.json", offset=3)
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"tim-ray: error: {run}: none of its 1 checkpoint directories is complete and verified")


# ---------------------------------------------------------------------------------------------------------------
# The training rule: --resume PATH wins over what is on disk, until this launch writes a checkpoint of its own.


def save(directory, step: int, launch: str | None):
    cfg = tiny_config()
    model = build_model(cfg.model, in_channels=1, text_dim=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_checkpoint(str(directory), model, torch.optim.AdamW(model.parameters()), None,
                        TrainState(step=step, launch=launch), to_dict(cfg), rank=0)
    return directory


def test_an_explicit_resume_path_wins_until_this_launch_has_checkpointed(tmp_path):
    run = tmp_path / "run"
    save(run / "checkpoint_00000004", 4, "earlier")
    save(run / "checkpoint_00000008", 8, "earlier")  # Ray's registered latest, from an earlier launch
    explicit = str(save(tmp_path / "elsewhere" / "checkpoint_00000002", 2, "other"))

    # The first worker group of the launch: PATH, not the run's newer checkpoints.
    assert resume_point(run, explicit, "now", registered=True) == explicit
    # A group restarted within the same launch, after it checkpointed: its own newest checkpoint.
    save(run / "checkpoint_00000004-2", 4, "now")
    assert resume_point(run, explicit, "now", registered=True) == str(run / "checkpoint_00000004-2")
    # ... and a damaged one of its own is skipped for the one before it, or PATH.
    flip_bit(save(run / "checkpoint_00000006", 6, "now") / "dcp" / "__0_0.distcp")
    notes = []
    assert resume_point(run, explicit, "now", registered=True, note=notes.append) == str(
        run / "checkpoint_00000004-2")
    assert len(notes) == 1 and notes[0].startswith("skipping checkpoint_00000006: ")
    # Without a launch id the explicit path always wins.
    assert resume_point(run, explicit, None, registered=True) == explicit
    # Without --resume PATH: the newest verified checkpoint, whoever wrote it.
    assert resume_point(run, None, "later", registered=True) == str(run / "checkpoint_00000008")

    flip_bit(tmp_path / "elsewhere" / "checkpoint_00000002" / "dcp" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="checkpoint_00000002/dcp/__0_0.distcp: sha256 mismatch"):
        resume_point(run, explicit, "next", registered=True)


def test_checkpoints_are_ordered_by_step_then_rewrite(tmp_path):
    for name in ("checkpoint_00000004", "checkpoint_00000008", "checkpoint_00000008-2", "checkpoint_00000010",
                 "checkpoint_junk"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "checkpoint_00000010", "checkpoint_00000008-2", "checkpoint_00000008", "checkpoint_00000004"]


def test_nothing_verifies_registered_fails_unregistered_starts_afresh(tmp_path):
    run = tmp_path / "run"
    (save(run / "checkpoint_00000004", 4, "x") / "checksums.rank0.json").unlink()  # like a pre-checksum one
    with pytest.raises(CheckpointError, match="no verified checkpoint to resume from .* move them away"):
        resume_point(run, None, "y", registered=True)
    notes = []
    assert resume_point(run, None, "y", registered=False, note=notes.append) is None
    assert notes[-1].startswith("starting afresh: none of the 1 checkpoint directories")
    assert newest_verified(run) is None


def test_moving_a_damaged_registered_checkpoint_away_sets_rays_registry_aside(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.name=run"])
    run = tmp_path / "run"
    save(run / "checkpoint_00000004", 4, "x")
    save(run / "checkpoint_00000008", 8, "x")
    (run / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_00000004"}, {"checkpoint_dir_name": "checkpoint_00000008"}]}))
    assert set_aside_stale_registry(cfg) is None  # nothing gone: Ray's registry stays

    shutil.move(run / "checkpoint_00000008", tmp_path / "damaged")
    line = set_aside_stale_registry(cfg)
    assert line.startswith("Ray's checkpoint registry names checkpoint_00000008, which is gone; set it aside as ")
    assert not (run / RAY_SNAPSHOT).exists() and len(list(run.glob(f"{RAY_SNAPSHOT}.stale-*"))) == 1
    assert resolve_resume(cfg, "auto") is None and latest_checkpoint(cfg) == str(run / "checkpoint_00000004")


def test_a_rewritten_step_gets_a_new_directory_name(tmp_path, monkeypatch):
    """A run that fell back past a damaged checkpoint_8 and reaches step 8 again writes checkpoint_8-2: never into
    the old directory, which Ray's retention could later delete under the new checkpoint."""
    import pyarrow.fs
    import ray.train

    from tim_ray.train.ray_checkpoints import _new_dir_name

    class Storage:
        storage_filesystem, experiment_fs_path = pyarrow.fs.LocalFileSystem(), str(tmp_path)

    class Context:
        def get_storage(self):
            return Storage()

    monkeypatch.setattr(ray.train, "get_context", Context)
    assert _new_dir_name(8) == "checkpoint_00000008"
    (tmp_path / "checkpoint_00000008").mkdir()
    assert _new_dir_name(8) == "checkpoint_00000008-2"
    (tmp_path / "checkpoint_00000008-2").mkdir()
    assert _new_dir_name(8) == "checkpoint_00000008-3"
