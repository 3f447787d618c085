"""What a sweep writes, from trial rows (no Ray): the ranking, the best config, the table and the plots; and the
`tim-ray tune` command's refusals, which come before Ray starts."""
import csv
from pathlib import Path

import pytest

from tim_ray.cli import main
from tim_ray.config import load_config
from tim_ray.tune import results as out
from tim_ray.tune.space import load_space

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tune" / "shapes.toml"
SPACE = REPO / "configs" / "tune" / "interval_sampler.toml"


def row(trial_id, objective, step, status=None, sampler="uniform_pair", p_mean=0.1):
    return out.TrialRow(trial_id=trial_id, params={"transition.interval_sampler": sampler, "transition.p_mean": p_mean},
                        status=status or ("finished" if step == 300 else "stopped"), step=step, objective=objective,
                        per_nfe={1: objective, 2: objective}, history=[(step, objective)] if step else [])


@pytest.fixture
def rows():
    return [row("a", 0.30, 300), row("b", 0.55, 100), row("c", 0.42, 300, sampler="independent", p_mean=-0.7),
            out.TrialRow("d", {"transition.interval_sampler": "uniform_pair", "transition.p_mean": 0.0},
                         status="error: diverged")]


def test_ranking_is_by_objective_and_the_best_trained_every_step(rows):
    assert [r.trial_id for r in out.ranked(rows, "max")] == ["b", "c", "a", "d"]
    assert [r.trial_id for r in out.ranked(rows, "min")] == ["a", "c", "b", "d"]
    assert out.best_of(rows, "max").trial_id == "c"  # b is higher, but was judged at step 100
    assert out.best_of([rows[1], rows[3]], "max") is None


def test_the_best_config_is_the_base_with_the_best_keys_and_loads(tmp_path, rows):
    base = load_config(RECIPE)
    path = tmp_path / "best.toml"
    path.write_text(out.best_config_toml(base, rows[2], tmp_path))
    best = load_config(path)
    assert best.transition.interval_sampler == "independent" and best.transition.p_mean == -0.7
    assert best.train.name == "tune-shapes_best"
    best.train.name, best.transition.interval_sampler, best.transition.p_mean = (
        base.train.name, base.transition.interval_sampler, base.transition.p_mean)
    assert best == base  # nothing else changed
    assert path.read_text().startswith("# The best trial (c) of the sweep in ")


def test_table_csv_and_plots(tmp_path, rows):
    base = load_config(RECIPE)
    space_file = tmp_path / "space.toml"
    space_file.write_text('[transition.interval_sampler]\nchoices = ["uniform_pair", "independent"]\n'
                          '[transition.p_mean]\nuniform = [-1.0, 0.5]\n')
    space = load_space(space_file, base)
    ranked = out.ranked(rows, "max")
    table = out.markdown_table(ranked, space, [1, 2]).splitlines()
    assert table[0] == ("| rank | trial | status | step | objective | nfe 1 | nfe 2 | transition.interval_sampler | "
                        "transition.p_mean |")
    assert table[2] == "| 1 | b | stopped | 100 | 0.55 | 0.55 | 0.55 | uniform_pair | 0.1 |"
    assert table[-1] == "| 4 | d | error: diverged |  |  |  |  | uniform_pair | 0 |"
    out.write_csv(ranked, space, [1, 2], tmp_path / "results.csv")
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["trial"] for r in written] == ["b", "c", "a", "d"] and written[1]["transition.p_mean"] == "-0.7"
    out.plot_curves(ranked, base, tmp_path / "curves.png")
    out.plot_params(ranked, space, out.best_of(rows, "max"), tmp_path / "params.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "params.png").stat().st_size > 1000


def run_cli(capsys, *args):
    code = main(["tune", *args])
    captured = capsys.readouterr()
    return code, captured.err


def test_tune_without_an_objective_is_one_line_before_ray_starts(capsys, tmp_path):
    import ray

    code, err = run_cli(capsys, "--space", str(SPACE), f"train.output_dir={tmp_path}")
    assert code == 2
    assert err == ("tim-ray: error: a sweep optimises eval.objective, which is not set: add eval.objective=shapes "
                   "(data.source = shapes) or eval.objective=class_agreement (fashion-mnist)\n")
    assert not ray.is_initialized()


def test_tune_with_a_bad_space_or_nothing_to_resume_is_one_line(capsys, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text("[transition.p_meen]\nuniform = [0.0, 1.0]\n")
    code, err = run_cli(capsys, str(RECIPE), f"train.output_dir={tmp_path}", "--space", str(space))
    assert (code, err) == (2, f"tim-ray: error: unknown key 'transition.p_meen' in {space}; did you mean "
                              f"'transition.p_mean'?\n")
    code, err = run_cli(capsys, str(RECIPE), f"train.output_dir={tmp_path}", "--space", str(SPACE), "--resume")
    assert (code, err) == (2, f"tim-ray: error: --resume: no sweep to resume in {tmp_path / 'tune-shapes'}\n")
    code, err = run_cli(capsys, str(RECIPE), "--space", str(SPACE), "--num-samples", "0")
    assert (code, err) == (2, "tim-ray: error: --num-samples and --max-concurrent must be >= 1, got 0 and 1\n")
