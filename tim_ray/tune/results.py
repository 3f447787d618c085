"""What a sweep leaves behind: its trials sorted by the objective (results.csv, and the same table printed as
markdown), the best trial's config as a ready-to-train TOML, and two plots (the objective against steps for every
trial, and the final objective against each swept key)."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from tim_ray.config import Config, dump_toml
from tim_ray.train.eval_objective import OBJECTIVE
from tim_ray.tune.space import Space, apply_params

RESULTS_FILE = "results.csv"
BEST_FILE = "best.toml"
CURVES_FILE = "objective_vs_step.png"
PARAMS_FILE = "objective_vs_params.png"
FINISHED = "finished"


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    status: str  # finished | stopped (early, by the scheduler) | unfinished (an interrupted sweep) | error: ...
    step: int | None = None  # of the last evaluation
    objective: float | None = None  # at the last evaluation
    per_nfe: dict[int, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, objective) of every evaluation


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first by the objective at each trial's last evaluation; trials that never reported it last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.objective is None, sign * (r.objective or 0.0)))


def best_of(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial that trained all its steps: a trial stopped early was judged at fewer steps."""
    finished = [r for r in ranked(rows, mode) if r.status == FINISHED]
    return finished[0] if finished else None


def _rounded(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_rows(rows: list[TrialRow], space: Space, nfe: list[int], number=str) -> tuple[list[str], list[list[str]]]:
    """(header, one row of cells per trial in the given order); `number` formats the values."""
    header = ["rank", "trial", "status", "step", OBJECTIVE, *(f"nfe {n}" for n in nfe), *space.keys]
    body = []
    for rank, row in enumerate(rows, start=1):
        body.append([str(rank), row.trial_id, row.status, "" if row.step is None else str(row.step),
                     "" if row.objective is None else number(row.objective),
                     *(number(row.per_nfe[n]) if n in row.per_nfe else "" for n in nfe),
                     *(number(row.params[key]) if key in row.params else "" for key in space.keys)])
    return header, body


def markdown_table(rows: list[TrialRow], space: Space, nfe: list[int]) -> str:
    header, body = table_rows(rows, space, nfe, number=_rounded)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def write_csv(rows: list[TrialRow], space: Space, nfe: list[int], path: Path) -> None:
    """The table at full precision."""
    header, body = table_rows(rows, space, nfe)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)


def best_config_toml(base: Config, best: TrialRow, sweep_dir: Path) -> str:
    """The sweep's base config with the best trial's keys, under a run name of its own: `tim-ray train` it."""
    cfg = apply_params(base, best.params, f"trial {best.trial_id}")
    cfg.train.name = f"{base.train.name}_best"
    swept = ", ".join(f"{k} = {_rounded(v)}" for k, v in best.params.items())
    header = (f"# The best trial ({best.trial_id}) of the sweep in {sweep_dir}: {OBJECTIVE} {best.objective:.4g} "
              f"({base.eval.objective}, mean over NFE {base.eval.nfe}) at step {best.step}.\n"
              f"# Swept: {swept}\n# Everything else is the sweep's base config.\n\n")
    return header + dump_toml(cfg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[TrialRow], cfg: Config, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for row in rows:
        if row.history:
            steps, values = zip(*row.history)
            ax.plot(steps, values, marker="o", markersize=3, label=f"{row.trial_id} ({row.status.split(':')[0]})")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{OBJECTIVE}: {cfg.eval.objective}, mean over NFE {cfg.eval.nfe}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(rows: list[TrialRow], space: Space, best: TrialRow | None, path: Path) -> None:
    """One panel per swept key: each trial's last objective against its value; hollow markers for trials that
    stopped before the last step (judged earlier), a star for the best."""
    plt = _plt()
    scored = [r for r in rows if r.objective is not None]
    fig, axes = plt.subplots(1, len(space.dimensions), figsize=(3.0 * len(space.dimensions), 3.0), squeeze=False)
    for ax, dim in zip(axes[0], space.dimensions):
        categories = [str(v) for v in dim.values] if dim.kind == "choices" else None

        def x_of(row):
            value = row.params[dim.key]
            return categories.index(str(value)) if categories else value

        for row in (r for r in scored if dim.key in r.params):
            done = row.status == FINISHED
            ax.scatter(x_of(row), row.objective, s=28, facecolors="C0" if done else "none", edgecolors="C0")
        if best is not None:
            ax.scatter(x_of(best), best.objective, s=140, marker="*", color="C3", zorder=3)
        if categories:
            ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=7)
        elif dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim.key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(OBJECTIVE)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
