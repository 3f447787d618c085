"""`tim-ray tune`: the sweep's driver. Start or join Ray, load the data once, open the MLflow parent run, run Ray
Tune over trials (tim_ray.tune.trial), then write the results (tim_ray.tune.results).

The sweep directory is the base config's run directory, <train.output_dir>/<train.name>:
    config.toml, space.toml      the base config and the space, as the sweep began
    tune/                        Ray Tune's experiment state (what --resume restores)
    trials/<name>_<trial id>/    each trial's run directory (config, checkpoints, sample grids, events)
    results.csv, best.toml, objective_vs_step.png, objective_vs_params.png
    mlflow.db, mlartifacts/      the parent run and one nested run per trial (unless tracking.uri names a server)
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tim_ray.config import Config, ConfigError, dump_toml, to_dict
from tim_ray.tracking import Tracker, tracking_uri
from tim_ray.tune import results as out
from tim_ray.tune.objective import MODES, OBJECTIVE
from tim_ray.tune.space import Space, load_space
from tim_ray.tune.trial import TrialPlan, run_trial, trial_name

SCHEDULERS = ("asha", "fifo")
SEARCHES = ("optuna", "random")
TUNE_DIR = "tune"
SPACE_FILE = "space.toml"
CONFIG_FILE = "config.toml"
REQUEST_FILE = "sweep.json"
ASHA_REDUCTION = 2  # keep the best half at each rung: with a handful of trials, 4 would stop nearly all


@dataclass(frozen=True)
class SweepRequest:
    space: str
    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "optuna"
    max_concurrent: int = 1
    resume: bool = False
    seed: int = 0  # of the search algorithm's draws

    def settings(self) -> str:
        """What a resume must repeat (Tune restores its own copy): everything but the space's path and --resume."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("space", "resume")}, sort_keys=True)


def _check(cfg: Config, request: SweepRequest) -> None:
    if not cfg.eval.objective:
        raise ConfigError("a sweep optimises eval.objective, which is not set: add eval.objective=shapes "
                          "(data.source = shapes) or eval.objective=class_agreement (fashion-mnist)")
    if request.num_samples < 1 or request.max_concurrent < 1:
        raise ConfigError(f"--num-samples and --max-concurrent must be >= 1, got {request.num_samples} and "
                          f"{request.max_concurrent}")
    if request.scheduler not in SCHEDULERS or request.search not in SEARCHES:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)} and --search one of "
                          f"{', '.join(SEARCHES)}")


def _check_resume(sweep_dir: Path, cfg: Config, space: Space, request: SweepRequest) -> None:
    """A new sweep needs a fresh directory; a resumed one the same base config, space and settings it began with
    (Tune restores its own copy of them, so a change would silently not apply)."""
    from ray import tune

    exists = tune.Tuner.can_restore(str(sweep_dir / TUNE_DIR))
    if not request.resume:
        if exists:
            raise ConfigError(f"{sweep_dir} already holds a sweep: add --resume to continue it, or choose another "
                              f"train.name")
        return
    if not exists:
        raise ConfigError(f"--resume: no sweep to resume in {sweep_dir}")
    began = [(CONFIG_FILE, dump_toml(cfg), "the base config"), (SPACE_FILE, space.text, "the space"),
             (REQUEST_FILE, request.settings(), "--num-samples/--scheduler/--search/--max-concurrent/--seed")]
    for name, now, what in began:
        if (sweep_dir / name).read_text() != now:
            raise ConfigError(f"--resume: {what} differs from what the sweep began with ({sweep_dir / name}); "
                              f"resume with the same, or start a new sweep under another train.name")


def _scheduler(request: SweepRequest, cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if request.scheduler == "fifo":
        return FIFOScheduler()
    # Rungs at evaluations, eval_every · 2^k steps. max_t one past the last step: ASHA stops (kills) a trial that
    # reaches max_t, which would cut off the end of its run; a trial that trains every step ends by itself.
    return ASHAScheduler(time_attr="step", max_t=cfg.train.steps + 1,
                         grace_period=min(cfg.train.eval_every, cfg.train.steps), reduction_factor=ASHA_REDUCTION)


def _searcher(request: SweepRequest):
    """Optuna's TPE, or random draws; either way at most max_concurrent trials at a time."""
    if request.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=request.seed), max_concurrent=request.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies TuneConfig.max_concurrent_trials only to searchers it builds itself; this one takes it directly.
    return BasicVariantGenerator(random_state=request.seed, max_concurrent=request.max_concurrent)


def _open_parent(cfg: Config, sweep_dir: Path, resume: bool) -> Tracker:
    tracker = Tracker.for_run_dir(cfg, sweep_dir, resume)
    if tracker.enabled:
        tracker.log_file(sweep_dir / SPACE_FILE)
    return tracker


def _tuner(cfg: Config, request: SweepRequest, space: Space, sweep_dir: Path, trainable):
    from ray import tune

    path = str(sweep_dir / TUNE_DIR)
    if request.resume:
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    return tune.Tuner(
        trainable, param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=MODES[cfg.eval.objective],
                                    scheduler=_scheduler(request, cfg), search_alg=_searcher(request),
                                    num_samples=request.num_samples),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir)))


def _unfinished_trials(sweep_dir: Path) -> set[str]:
    """Ids of the trials that Tune's last saved state holds as not done: after an interruption (Ctrl-C), the
    returned results call them terminated, but the state that --resume restores says they were running."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(sweep_dir / TUNE_DIR)).trials
    return {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _settle_trial_runs(parent: Tracker, cfg: Config, rows: list[out.TrialRow]) -> None:
    """Close each trial's MLflow run: a trial stopped early is killed with its Ray actor before it can."""
    children = parent.child_runs()
    for row in rows:
        run_id = children.get(trial_name(cfg, row.trial_id))
        if run_id:
            status = ("FINISHED" if row.status == out.FINISHED else
                      "FAILED" if row.status.startswith("error") else "KILLED")
            Tracker(parent.uri, run_id).finish(status)


def _write_results(cfg: Config, space: Space, sweep_dir: Path, rows: list[out.TrialRow], parent: Tracker):
    best = out.best_of(rows, MODES[cfg.eval.objective])
    out.write_csv(rows, space, cfg.eval.nfe, sweep_dir / out.RESULTS_FILE)
    out.plot_curves(rows, cfg, sweep_dir / out.CURVES_FILE)
    out.plot_params(rows, space, best, sweep_dir / out.PARAMS_FILE)
    (sweep_dir / out.BEST_FILE).unlink(missing_ok=True)  # a resumed sweep's earlier best may no longer be it
    if best is not None:
        (sweep_dir / out.BEST_FILE).write_text(out.best_config_toml(cfg, best, sweep_dir))
        parent.log_metrics({f"best_{OBJECTIVE}": best.objective}, step=best.step)
    for name in (out.RESULTS_FILE, out.CURVES_FILE, out.PARAMS_FILE, out.BEST_FILE):
        parent.log_file(sweep_dir / name)
    return best


def run_sweep(cfg: Config, request: SweepRequest, address: str | None = None) -> int:
    from ray import tune

    from tim_ray.data.batches import load_training_data
    from tim_ray.train.launch import run_dir_of, start_ray

    _check(cfg, request)
    space = load_space(request.space, cfg)
    sweep_dir = run_dir_of(cfg)
    _check_resume(sweep_dir, cfg, space, request)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / CONFIG_FILE).write_text(dump_toml(cfg))
    (sweep_dir / SPACE_FILE).write_text(space.text)
    (sweep_dir / REQUEST_FILE).write_text(request.settings())
    print(f"tim-ray tune: {start_ray(cfg, address)}; preparing data ({cfg.data.source})", flush=True)
    data = load_training_data(cfg, sweep_dir)
    parent = _open_parent(cfg, sweep_dir, request.resume)
    plan = TrialPlan(base=to_dict(cfg), sweep_dir=str(sweep_dir),
                     tracking_uri=tracking_uri(cfg, sweep_dir) if parent.enabled else "",
                     parent_run_id=parent.run_id)
    mlflow = f"\n  mlflow: {plan.tracking_uri} (run {parent.run_id})" if parent.enabled else ""
    print(f"tim-ray tune: {'resuming' if request.resume else 'starting'} {request.num_samples} trials of "
          f"{cfg.train.steps} steps ({request.search} search, {request.scheduler}, {request.max_concurrent} at a "
          f"time) over {', '.join(space.keys)}\n  sweep directory: {sweep_dir}\n  objective: {cfg.eval.objective}"
          f" averaged over NFE {cfg.eval.nfe}, every {cfg.train.eval_every} steps{mlflow}", flush=True)
    grid = _tuner(cfg, request, space, sweep_dir, tune.with_parameters(run_trial, plan=plan, data=data)).fit()
    unfinished = _unfinished_trials(sweep_dir)
    rows = out.ranked(out.collect(grid, space, cfg, unfinished), MODES[cfg.eval.objective])
    _settle_trial_runs(parent, cfg, rows)
    best = _write_results(cfg, space, sweep_dir, rows, parent)
    done = len(rows) - len(unfinished)
    interrupted = done < request.num_samples
    parent.finish("KILLED" if interrupted else "FINISHED" if best else "FAILED")
    print(out.markdown_table(rows, space, cfg.eval.nfe), flush=True)
    print(f"tim-ray tune: results in {sweep_dir} ({out.RESULTS_FILE}, {out.CURVES_FILE}, {out.PARAMS_FILE})",
          flush=True)
    if interrupted:
        print(f"tim-ray tune: interrupted with {done} of {request.num_samples} "
              f"trials done; run the same command with --resume to continue", file=sys.stderr, flush=True)
        return 130
    if best is None:
        print("tim-ray tune: no trial trained all its steps; no best config", file=sys.stderr, flush=True)
        return 1
    print(f"tim-ray tune: best trial {best.trial_id}: {OBJECTIVE} {best.objective:.4g} -> "
          f"{sweep_dir / out.BEST_FILE} (tim-ray train {sweep_dir / out.BEST_FILE})", flush=True)
    return 0
