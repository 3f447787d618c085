"""The config system: TOML in, dotted overrides, errors that name the key, derived values, lossless dump."""
from pathlib import Path

import pytest

from tim_ray.config import Config, ConfigError, Derived, dump_toml, from_dict, load_config, parse_override, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_quickstart_recipe():
    assert load_config(REPO / "configs" / "quickstart.toml") == Config()


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    dumped = tmp_path / "resolved.toml"
    dumped.write_text(dump_toml(cfg))
    assert load_config(dumped) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_dump_round_trips_awkward_values(tmp_path):
    cfg = load_config(None, ['train.name="a \\"quoted\\" name"', "optim.lr=3.0000000000000004e-4",
                             "eval.nfe=[1, 3]", "sample.cfg_interval=[0.1, 0.7]", "ema.enabled=false"])
    assert cfg.train.name == 'a "quoted" name' and cfg.optim.lr == 3.0000000000000004e-4
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_unknown_key_names_key_file_and_closest_key(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[optim]\nlrr = 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"unknown key 'optim.lrr' in {path}; did you mean 'optim.lr'?"


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[optimizer]\nlr = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.lr' in .*did you mean 'optim.lr'\?"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr in the command line must be float, got str 'abc'"),
    ("train.steps=1.5", "train.steps in the command line must be int, got float 1.5"),
    ("train.steps=true", "train.steps in the command line must be int, got bool True"),
    ("ema.enabled=1", "ema.enabled in the command line must be bool, got int 1"),
    ("eval.nfe=4", "eval.nfe in the command line must be a list of int, got 4"),
    ("transition.path=edm", "transition.path = 'edm' is not one of otfm, trigflow"),
    ("train.batch_size=0", "train.batch_size must be > 0, got 0"),
    ("transition.diffusion_ratio=1.5", "transition.diffusion_ratio must be in [0, 1], got 1.5"),
    ("ray.min_workers=5", "ray.min_workers must be in [0, ray.num_workers=1], got 5"),
    ("optim", "override 'optim' must look like section.key=value"),
])
def test_bad_values_give_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_int_is_accepted_for_float_and_overrides_apply_in_order():
    cfg = load_config(None, ["optim.lr=1", "optim.lr=2"])
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)


def test_override_values_are_toml_and_bare_words_are_strings():
    assert parse_override("data.source=shapes") == ("data", "source", "shapes")
    assert parse_override("data.path=s3://bucket/x") == ("data", "path", "s3://bucket/x")
    assert parse_override("train.steps=10") == ("train", "steps", 10)
    assert parse_override("eval.nfe=[1,2]") == ("eval", "nfe", [1, 2])


def test_derived_batch_and_linear_lr_scaling():
    cfg = load_config(None, ["train.batch_size=32", "train.grad_accum=2", "ray.num_workers=4",
                             "optim.lr=1e-4", "optim.base_batch=256"])
    d = Derived.of(cfg)
    assert d.global_batch == 32 * 4 * 2
    assert d.lr == pytest.approx(1e-4 * 256 / 256)
    # an elastic restart at another world size: the LR follows the global batch
    assert Derived.of(cfg, world_size=2).lr == pytest.approx(1e-4 * 128 / 256)
    cfg.optim.scale_lr = False
    assert Derived.of(cfg).lr == 1e-4
