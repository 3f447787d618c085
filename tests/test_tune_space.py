"""Search spaces: the shipped space and recipe load; every bad entry is one config-system error naming the key."""
from pathlib import Path

import numpy as np
import pytest

from tim_ray.config import ConfigError, load_config
from tim_ray.tune.search import draw
from tim_ray.tune.space import apply_params, load_space

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = REPO / "configs" / "tune"


@pytest.fixture
def base():
    return load_config(TUNE_CONFIGS / "shapes.toml")


def space_file(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_shipped_space_covers_the_interval_law_and_loads_against_the_shipped_recipe(base):
    space = load_space(TUNE_CONFIGS / "interval_sampler.toml", base)
    assert set(space.keys) == {f"transition.{k}" for k in (
        "interval_sampler", "p_mean", "p_std", "delta_logit_mean", "delta_logit_std", "diffusion_ratio",
        "consistency_ratio", "dde_epsilon")}
    assert base.eval.objective == "shapes" and base.data.source == "shapes"
    sampler = space.dimensions[space.keys.index("transition.interval_sampler")]
    assert sampler.values == ("logit_normal_pair", "uniform_pair", "independent")
    assert sampler.distribution().choices == (0, 1, 2) and sampler.from_draw(2) == "independent"
    epsilon = space.dimensions[space.keys.index("transition.dde_epsilon")].distribution()
    assert (epsilon.low, epsilon.high, epsilon.log) == (0.001, 0.02, True)


@pytest.mark.parametrize("name", ["interval_sampler.toml", "sampler_and_ratio.toml"])
@pytest.mark.parametrize("search", ["random", "optuna"])
def test_every_drawn_point_of_a_shipped_space_is_a_valid_config_inside_the_space(base, name, search):
    space = load_space(TUNE_CONFIGS / name, base)
    for index in range(20):
        params = draw(space, search, 0, index, "max")
        cfg = apply_params(base, params, "a draw")
        assert cfg.transition.p_mean == pytest.approx(params["transition.p_mean"])
        assert cfg.transition.interval_sampler == params["transition.interval_sampler"]
        assert all(dim.contains(params[dim.key]) for dim in space.dimensions)


def test_ranges_of_int_keys_draw_ints_including_both_bounds(tmp_path, base):
    space = load_space(space_file(tmp_path, "[train.batch_size]\nuniform = [8, 10]\n"), base)
    drawn = [draw(space, "random", seed, 0, "max")["train.batch_size"] for seed in range(60)]
    assert set(drawn) == {8, 9, 10} and all(type(value) is int for value in drawn)
    assert apply_params(base, {"train.batch_size": np.int64(9)}, "a draw").train.batch_size == 9
    batch = space.dimensions[0]
    assert batch.contains(8) and not batch.contains(11) and not batch.contains(9.0) and not batch.contains(True)


@pytest.mark.parametrize("text, message", [
    ("[transition.p_meen]\nuniform = [0.0, 1.0]\n",
     "unknown key 'transition.p_meen' in {path}; did you mean 'transition.p_mean'?"),
    ("[transition.interval_sampler]\nchoices = [\"uniform_pair\", \"gaussian\"]\n",
     "transition.interval_sampler = 'gaussian' is not one of logit_normal_pair, uniform_pair, independent "
     "(from transition.interval_sampler.choices in {path})"),
    ("[transition.dde_epsilon]\nloguniform = [0.001, 0.2]\n",
     "transition.dde_epsilon must be in (0, 0.1), got 0.2 (from transition.dde_epsilon.loguniform in {path})"),
    ("[transition.p_std]\nuniform = [\"a\", \"b\"]\n",
     "transition.p_std.uniform in {path} must be [lo, hi] with lo < hi, got ['a', 'b']"),
    ("[transition.p_std]\nuniform = [2.0, 1.0]\n",
     "transition.p_std.uniform in {path} must be [lo, hi] with lo < hi, got [2.0, 1.0]"),
    ("[transition.p_std]\nloguniform = [0.0, 1.0]\n", "transition.p_std.loguniform in {path} needs lo > 0, got [0.0, 1.0]"),
    ("[transition.p_std]\nuniform = [1.0, 2.0]\nchoices = [1.0]\n",
     "transition.p_std in {path} must have exactly one of choices, uniform, loguniform, "
     "got {{'uniform': [1.0, 2.0], 'choices': [1.0]}}"),
    ("[transition.p_std]\nnormal = [1.0, 2.0]\n",
     "transition.p_std in {path} must have exactly one of choices, uniform, loguniform, got {{'normal': [1.0, 2.0]}}"),
    ("[transition.interval_sampler]\nchoices = []\n",
     "transition.interval_sampler.choices in {path} must be a non-empty list, got []"),
    ("[transition]\np_mean = 0.5\n",
     "{path}: every entry must be a table [section.key] holding one of choices, uniform, loguniform; "
     "'transition' is not"),
    ("[data.max_samples]\nchoices = [100, 200]\n",
     "data.max_samples in {path} cannot be swept: every trial trains on the same data, loaded once for the sweep"),
    ("[train.steps]\nchoices = [100, 200]\n",
     "train.steps in {path} cannot be swept: the scheduler compares trials at the same steps"),
    ("[eval.nfe]\nchoices = [[1], [2]]\n",
     "eval.nfe in {path} cannot be swept: it defines the objective that trials are compared by"),
    ("# nothing\n", "{path} sweeps nothing: add a table per config key, e.g. [transition.p_mean] "
                    "uniform = [-1.0, 0.5]"),
])
def test_bad_spaces_are_one_line_errors(tmp_path, base, text, message):
    path = space_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path, base)
    assert str(err.value) == message.format(path=path)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_space_files(tmp_path, base):
    with pytest.raises(ConfigError, match="space file 'nope.toml' does not exist"):
        load_space("nope.toml", base)
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_space(space_file(tmp_path, "[transition.p_mean\n"), base)
