"""The command line as a user meets it: subprocesses, exit codes, one-line errors."""
import os
import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tim_ray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "RAY_ADDRESS": ""}, timeout=120)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for name in ["train", "sample", "eval", "tune", "precompute", "export", "config", "env"]:
        assert f"    {name}" in out.stdout


def test_config_show_with_a_typo_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[optim]\nlrr = 1e-4\n")
    out = run("config", "show", str(bad))
    assert out.returncode == 2
    assert out.stderr == f"tim-ray: error: unknown key 'optim.lrr' in {bad}; did you mean 'optim.lr'?\n"
    assert out.stdout == ""


def test_config_show_prints_loadable_toml_with_overrides(tmp_path):
    out = run("config", "show", "train.steps=7", "data.source=shapes")
    assert out.returncode == 0
    path = tmp_path / "resolved.toml"
    path.write_text(out.stdout)
    again = run("config", "validate", str(path))
    assert again.returncode == 0, again.stderr
    assert "steps = 7" in out.stdout and 'source = "shapes"' in out.stdout


def test_missing_config_file_is_a_usage_error():
    out = run("config", "validate", "no/such.toml")
    assert out.returncode == 2 and out.stderr == "tim-ray: error: config file 'no/such.toml' does not exist\n"


def test_unknown_subcommand_is_a_usage_error():
    out = run("trian")
    assert out.returncode == 2 and "invalid choice: 'trian'" in out.stderr


def test_env_reports_versions_devices_and_cluster():
    out = run("env")
    assert out.returncode == 0, out.stderr
    for name in ["python", "torch", "ray", "mlflow", "transformers", "pyarrow", "flash-attn", "cpu", "ray cluster"]:
        assert f"\n{name}:" in "\n" + out.stdout


def test_precompute_refuses_an_unusable_config_with_one_line(tmp_path):
    out = run("precompute", "data.source=parquet", "--out", str(tmp_path / "shards"))
    assert out.returncode == 2
    assert out.stderr == ("tim-ray: error: data.source = 'parquet' needs data.path (a directory, glob or URI)\n")


def test_data_errors_are_found_before_ray_starts_and_leave_nothing_behind(tmp_path):
    """A user's own parquet, given the wrong way: each mistake is one line within seconds, from the dry run as
    from a real run and from precompute (which then writes no --out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"picture": [b"x"], "caption": ["c"]}), tmp_path / "pq" / "a.parquet")
    file_as_fashion = run("train", "--dry-run", f"data.path={tmp_path / 'pq' / 'a.parquet'}")
    assert file_as_fashion.returncode == 2 and file_as_fashion.stderr.count("\n") == 1
    assert "set data.source = 'parquet'" in file_as_fashion.stderr
    missing = run("train", "--dry-run", "data.source=parquet", f"data.path={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and missing.stderr == (
        f"tim-ray: error: data.path '{tmp_path / 'nowhere'}' does not exist\n")
    for command in (["train"], ["precompute", "--out", str(tmp_path / "shards")]):
        columns = run(*command, "data.source=parquet", f"data.path={tmp_path / 'pq'}", cwd=tmp_path)
        assert columns.returncode == 2 and columns.stderr.count("\n") == 1
        assert "has no image column" in columns.stderr and "it has picture, caption" in columns.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "runs").exists()
    plan = run("train", "--dry-run", "data.max_samples=100")
    assert plan.returncode == 0 and "100 source rows in 1 units" in plan.stdout


def test_overrides_after_an_option_still_apply():
    dry = run("train", "configs/quickstart.toml", "--dry-run", "train.batch_size=32")
    assert dry.returncode == 0, dry.stderr
    assert "32" in dry.stdout and dry.stdout != run("train", "configs/quickstart.toml", "--dry-run").stdout
    bogus = run("train", "--dry-run", "--bogus")
    assert bogus.returncode == 2 and "unrecognized arguments: --bogus" in bogus.stderr
