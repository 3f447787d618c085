"""Exports and the inference loader: the exported tensors equal what load_weights reads from the DCP shards, EMA is
picked when present, run directories resolve to their newest checkpoint, bad paths are one-line errors, and a
crafted DCP index cannot run code."""
import json
import pickle

import pytest
import torch
from eval_fixtures import CodeRunningPickle, write_checkpoint
from safetensors.torch import load_file

from tim_ray.artifacts import checksums
from tim_ray.artifacts.checkpoint import load_weights
from tim_ray.artifacts.export import ExportError, export_checkpoint, load_for_inference, stored_tensor_shapes
from tim_ray.cli import main
from tim_ray.config import load_config
from tim_ray.models.registry import build_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # load_weights in one process


def _fresh_model(checkpoint):
    cfg = load_config(None, ["model.arch=tim-tiny", "model.conditioning=class"])
    torch.manual_seed(123)  # different from the checkpoint's seed: every loaded tensor must come from the file
    return build_model(cfg.model, in_channels=1, text_dim=None)


@pytest.mark.parametrize("ema", [False, True])
def test_export_holds_exactly_the_dcp_weights(tmp_path, ema):
    checkpoint = write_checkpoint(tmp_path / "run")
    out = export_checkpoint(checkpoint, tmp_path / "export", ema=ema)

    expected = _fresh_model(checkpoint)
    load_weights(str(checkpoint), expected, use_ema=ema)
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    info = json.loads((out / "export.json").read_text())
    assert info["weights"] == ("ema" if ema else "model") and info["state"]["step"] == 7
    assert "torch" in info["versions"]
    assert load_config(out / "config.toml").model.arch == "tim-tiny"

    loaded = load_for_inference(out)
    assert loaded.kind == "export" and loaded.weights == info["weights"] and loaded.state.step == 7
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_loader_prefers_ema_and_honours_a_choice(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    trained, ema = _fresh_model(checkpoint), _fresh_model(checkpoint)
    load_weights(str(checkpoint), trained, use_ema=False)
    load_weights(str(checkpoint), ema, use_ema=True)
    weight = "blocks.0.attn.qkv.weight"
    assert not torch.equal(trained.state_dict()[weight], ema.state_dict()[weight])  # the two sets differ

    default = load_for_inference(checkpoint)
    assert default.weights == "ema" and torch.equal(default.model.state_dict()[weight], ema.state_dict()[weight])
    raw = load_for_inference(checkpoint, ema=False)
    assert raw.weights == "model" and torch.equal(raw.model.state_dict()[weight], trained.state_dict()[weight])
    assert not raw.model.training and default.run_dir == tmp_path / "run"


def test_without_ema_the_trained_weights_are_used_and_insisting_fails(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", ema=False)
    assert load_for_inference(checkpoint).weights == "model"
    with pytest.raises(ExportError, match="holds no EMA weights"):
        load_for_inference(checkpoint, ema=True)
    out = export_checkpoint(checkpoint, tmp_path / "export")
    with pytest.raises(ExportError, match="holds no EMA weights"):
        load_for_inference(out, ema=True)


def test_an_ema_export_refuses_the_trained_weights(tmp_path):
    out = export_checkpoint(write_checkpoint(tmp_path / "run"), tmp_path / "export", ema=True)
    with pytest.raises(ExportError, match="holds the ema weights only; export again without --ema"):
        load_for_inference(out, ema=False)


def test_a_run_directory_resolves_to_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, step=5)
    write_checkpoint(run, step=12)
    (run / "checkpoint_00000020").mkdir()  # being written: no state.json yet
    loaded = load_for_inference(run)
    assert loaded.state.step == 12 and loaded.source == (run / "checkpoint_00000012").resolve()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "is not a tim-ray checkpoint"),
    (lambda p: "s3://bucket/run", "is remote storage"),
])
def test_wrong_paths_are_one_line_errors(tmp_path, make, message):
    with pytest.raises(ExportError, match=message) as info:
        load_for_inference(make(tmp_path))
    assert "\n" not in str(info.value)


def test_export_refuses_to_overwrite(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    export_checkpoint(checkpoint, tmp_path / "export")
    with pytest.raises(ExportError, match="already holds an export"):
        export_checkpoint(checkpoint, tmp_path / "export")


def test_a_weights_file_cut_short_by_a_full_disk_fails_the_export(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):  # what safetensors left on a full disk: a cut file, no error
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as file:
            file.truncate(file.seek(0, 2) - 1000)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ExportError, match=r"model.safetensors: \d+ bytes on disk, \d+ expected: the write was cut "
                                          r"short \(disk full\?\)"):
        export_checkpoint(write_checkpoint(tmp_path / "run"), tmp_path / "export")
    assert not (tmp_path / "export" / checksums.MANIFEST).exists()  # never sealed as if complete


def test_a_crafted_dcp_index_is_refused_before_anything_runs(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    witness = tmp_path / "code-ran"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(CodeRunningPickle(str(witness))))
    checksums.seal(checkpoint, "checksums.rank0.json")  # a crafter who rewrites the checksums too
    with pytest.raises(ExportError, match="refusing builtins.open|refusing io.open"):
        load_for_inference(checkpoint)
    assert not witness.exists()


def test_the_dcp_index_lists_both_weight_sets(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run")
    shapes = stored_tensor_shapes(checkpoint)
    model = _fresh_model(checkpoint)
    assert shapes["model"] == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["ema"] == {k: tuple(v.shape) for k, v in model.named_parameters()}


def test_cli_export_writes_the_files_and_bad_paths_exit_2(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e"), "--ema"]) == 0
    assert "EMA weights of step 7" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["checksums.json", "config.toml", "export.json",
                                                                  "model.safetensors"]
    assert main(["export", str(checkpoint / "dcp"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a tim-ray checkpoint" in err
