"""`tim-ray tune`: the sweep's driver. Start or join Ray, load the data once, open the MLflow parent run, run Ray
Tune over trials (tim_ray.tune.trial), then write the results (tim_ray.tune.results).

The sweep directory is the base config's run directory, <train.output_dir>/<train.name>:
    sweep.json                   the sweep's record: settings, config, space, every trial's keys, status and
                                 evaluations (tim_ray.tune.state); what --resume rebuilds the sweep from
    config.toml, space.toml      the base config and the space, as the sweep began (for people to read)
    trials/<name>_<trial id>/    each trial's run directory (config, checkpoints, sample grids, events)
    results.csv, best.toml, objective_vs_step.png, objective_vs_params.png
    mlflow.db, mlartifacts/      the parent run and one nested run per trial (unless tracking.uri names a server)

Ray Tune's own experiment state (pickles) goes to a private temporary directory of the driver and is deleted after
the run: a resume starts a new Tune run from sweep.json and never calls Tuner.restore, so no pickle is ever read
from the sweep directory, which on a cluster is a shared volume that other jobs can write.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tim_ray.config import Config, ConfigError, dump_toml, to_dict
from tim_ray.tracking import Tracker, tracking_uri
from tim_ray.train.eval_objective import MODES, OBJECTIVE
from tim_ray.tune import results as out
from tim_ray.tune.search import SEARCHES
from tim_ray.tune.space import Space, load_space
from tim_ray.tune.state import STATE_FILE, SweepState, load_state
from tim_ray.tune.trial import TrialPlan, run_trial, trial_name

SCHEDULERS = ("asha", "fifo")
TUNE_DIR = "tune"  # the name of each Tune run, in a private temporary directory
SPACE_FILE = "space.toml"
CONFIG_FILE = "config.toml"
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

    def settings(self) -> dict:
        """What a resume must repeat: everything but the space's path and --resume."""
        return {k: v for k, v in asdict(self).items() if k not in ("space", "resume")}


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


def _open_state(sweep_dir: Path, cfg: Config, space: Space, request: SweepRequest) -> SweepState:
    """A new sweep's record in a fresh directory, or the record of the sweep to resume, which must have begun with
    the same base config, space and settings."""
    path = sweep_dir / STATE_FILE
    if request.resume:
        return load_state(path, request.settings(), cfg, space)
    if path.exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep: add --resume to continue it, or choose another "
                          f"train.name")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / CONFIG_FILE).write_text(dump_toml(cfg))
    (sweep_dir / SPACE_FILE).write_text(space.text)
    return SweepState.new(path, request.settings(), cfg, space)


def _scheduler(request: SweepRequest, cfg: Config, state: SweepState):
    from ray.tune.schedulers import FIFOScheduler

    from tim_ray.tune.bridge import SweepASHA

    if request.scheduler == "fifo":
        return FIFOScheduler()
    # Rungs at evaluations, eval_every · 2^k steps. max_t one past the last step: ASHA stops (kills) a trial that
    # reaches max_t, which would cut off the end of its run; a trial that trains every step ends by itself.
    return SweepASHA(time_attr="step", metric=OBJECTIVE, mode=MODES[cfg.eval.objective], max_t=cfg.train.steps + 1,
                     grace_period=min(cfg.train.eval_every, cfg.train.steps),
                     reduction_factor=ASHA_REDUCTION).replay(state)


def _searcher(request: SweepRequest, cfg: Config, space: Space, state: SweepState):
    """The sweep's own draws (tim_ray.tune.search), at most max_concurrent trials at a time."""
    from ray.tune.search import ConcurrencyLimiter

    from tim_ray.tune.bridge import TrialSource

    source = TrialSource(state, space, request.search, request.seed, request.num_samples, MODES[cfg.eval.objective])
    return ConcurrencyLimiter(source, max_concurrent=request.max_concurrent)


def _open_parent(cfg: Config, sweep_dir: Path, resume: bool) -> Tracker:
    tracker = Tracker.for_run_dir(cfg, sweep_dir, resume)
    if tracker.enabled:
        tracker.log_file(sweep_dir / SPACE_FILE)
    return tracker


def _run_trials(cfg: Config, request: SweepRequest, space: Space, state: SweepState, trainable,
                verbose: bool = False) -> None:
    """One Ray Tune run over the trials the sweep still needs. Tune's experiment state (pickles) goes to a private
    temporary directory, deleted afterwards: nothing Tune writes is ever read back from shared storage."""
    from ray import tune

    from tim_ray.tune.bridge import Recorder

    launches = request.num_samples - state.ended_count()
    private = tempfile.mkdtemp(prefix="tim-ray-tune-")
    try:
        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(scheduler=_scheduler(request, cfg, state),
                                        search_alg=_searcher(request, cfg, space, state), num_samples=launches),
            # Tune's own trial tables only with --verbose; the trials' progress lines are tim-ray's
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=private, verbose=None if verbose else 0,
                                      callbacks=[Recorder(state, cfg.train.steps, cfg.eval.nfe)]),
        ).fit()
    finally:
        shutil.rmtree(private, ignore_errors=True)


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


def _launch(cfg: Config, request: SweepRequest, space: Space, state: SweepState, parent: Tracker,
            address: str | None, verbose: bool = False) -> None:
    """Start or join Ray, load the data once for every trial, and run the trials the sweep still needs."""
    from ray import tune

    from tim_ray.data.batches import open_training_data
    from tim_ray.train.launch import start_ray

    sweep_dir = state.path.parent
    print(f"tim-ray tune: {start_ray(cfg, address, verbose)}; preparing data ({cfg.data.source})", flush=True)
    data = open_training_data(cfg)
    plan = TrialPlan(base=to_dict(cfg), sweep_dir=str(sweep_dir),
                     tracking_uri=tracking_uri(cfg, sweep_dir) if parent.enabled else "",
                     parent_run_id=parent.run_id)
    mlflow = f"\n  mlflow: {plan.tracking_uri} (run {parent.run_id})" if parent.enabled else ""
    resumed = (f" ({state.ended_count()} that ended are kept, {len(state.live())} cut short resume from their "
               f"own checkpoints)" if request.resume else "")
    print(f"tim-ray tune: {'resuming' if request.resume else 'starting'} {request.num_samples} trials of "
          f"{cfg.train.steps} steps{resumed} ({request.search} search, {request.scheduler}, "
          f"{request.max_concurrent} at a time) over {', '.join(space.keys)}\n  sweep directory: {sweep_dir}"
          f"\n  objective: {cfg.eval.objective} averaged over NFE {cfg.eval.nfe}, every {cfg.train.eval_every} "
          f"steps{mlflow}", flush=True)
    _run_trials(cfg, request, space, state, tune.with_parameters(run_trial, plan=plan, data=data), verbose)


def run_sweep(cfg: Config, request: SweepRequest, address: str | None = None, verbose: bool = False) -> int:
    from tim_ray.train.launch import check_local_fit, run_dir_of

    _check(cfg, request)
    check_local_fit(cfg, address)  # a trial that cannot fit the local Ray would wait forever
    space = load_space(request.space, cfg)
    sweep_dir = run_dir_of(cfg)
    state = _open_state(sweep_dir, cfg, space, request)
    parent = _open_parent(cfg, sweep_dir, request.resume)
    if state.ended_count() < request.num_samples:  # else every trial has ended: write the results again
        _launch(cfg, request, space, state, parent, address, verbose)
    rows = out.ranked(state.rows(), MODES[cfg.eval.objective])
    _settle_trial_runs(parent, cfg, rows)
    best = _write_results(cfg, space, sweep_dir, rows, parent)
    done = state.ended_count()
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
