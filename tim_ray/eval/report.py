"""What `tim-ray eval` leaves behind: eval.json, a table on stdout, a quality-vs-NFE plot, a sample grid, and an
MLflow run holding all of them (metrics logged with step = NFE, so MLflow's own charts are quality-vs-NFE too)."""
from __future__ import annotations

import json
from pathlib import Path

from tim_ray.config import Config, from_dict, to_dict
from tim_ray.eval.evaluate import LOWER_IS_BETTER
from tim_ray.tracking import SQLITE_FILE, Tracker

RESULTS_FILE = "eval.json"
PLOT_FILE = "quality_vs_nfe.png"
GRID_FILE = "samples.png"


def headline_metrics(results: dict) -> list[str]:
    """The per-NFE metrics to show: every requested one, without the per-category/per-triple breakdowns."""
    first = results["by_nfe"][str(results["nfe"][0])]
    return [name for name in first if "." not in name]


def table(results: dict) -> str:
    names = headline_metrics(results)
    header = ["NFE", *names]
    lines = [[str(n), *(f"{results['by_nfe'][str(n)][m]:.4g}" for m in names)] for n in results["nfe"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *lines])
    for name, value in results["nfe_independent"].items():
        if "." not in name:
            text += f"\n{name} (any NFE): {value:.4g}"
    return text


def plot(results: dict, path: Path) -> None:
    """One panel per metric against NFE (log2 axis), with which direction is better in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = headline_metrics(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(results["nfe"], [results["by_nfe"][str(n)][name] for n in results["nfe"]], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["nfe"], [str(n) for n in results["nfe"]])
        ax.set_xlabel("NFE (steps)")
        ax.set_title(f"{name} ({'lower' if name in LOWER_IS_BETTER or name.startswith('seconds') else 'higher'}"
                     " is better)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"step {results['step']}, {results['weights']} weights, {results['num_samples']} samples",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tracking_target(cfg: Config, loaded, out: Path, uri: str | None) -> tuple[Config, Path, str | None]:
    """(config to log with, directory for the default sqlite store, parent run id) of the eval run: an explicit
    `uri`; else the training run's tracking server; else the training run's own sqlite file when the checkpoint
    lies in its run directory (the eval run is then nested under the training run); else a sqlite file in `out`."""
    tree = to_dict(cfg)
    tree["tracking"]["enabled"] = True  # an eval is always recorded, even of a run that tracked nothing
    if uri:
        tree["tracking"]["uri"] = uri
    store, parent = out, None
    if not uri and cfg.tracking.uri:
        parent = loaded.state.mlflow_run_id
    elif not uri and loaded.run_dir is not None and (loaded.run_dir / SQLITE_FILE).is_file():
        store, parent = loaded.run_dir, loaded.state.mlflow_run_id
    return from_dict(tree), store, parent


def log_to_mlflow(results: dict, cfg: Config, loaded, out: Path, uri: str | None) -> Tracker:
    """An eval run holding the config (with the eval settings), every metric (step = NFE; NFE-independent ones at
    step 0) and the JSON, plot and grid files."""
    tree = to_dict(cfg)
    tree["eval"].update(nfe=results["nfe"], num_samples=results["num_samples"], metrics=results["metrics"])
    tree["sample"].update(results["sample"], seed=results["seed"])
    logged_cfg, store_dir, parent = tracking_target(from_dict(tree), loaded, out, uri)
    run_name = f"eval-{cfg.train.name}-step{results['step']}"
    tracker = Tracker.create_run(logged_cfg, store_dir, run_name, parent_run_id=parent)
    for nfe in results["nfe"]:
        tracker.log_metrics(results["by_nfe"][str(nfe)], step=nfe)
    if results["nfe_independent"]:
        tracker.log_metrics(results["nfe_independent"], step=0)
    for name in (RESULTS_FILE, PLOT_FILE, GRID_FILE):
        tracker.log_file(out / name)
    tracker.finish()
    return tracker


def write_report(results: dict, rows, cfg: Config, loaded, out: Path, uri: str | None = None) -> Tracker:
    """Write eval.json, the plot and the grid under `out`, then log them to MLflow; returns the tracker."""
    from tim_ray.eval.grid import grid_image

    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / PLOT_FILE)
    grid_image(rows, [f"{n} NFE" for n in results["nfe"]]).save(out / GRID_FILE)
    return log_to_mlflow(results, cfg, loaded, out, uri)
