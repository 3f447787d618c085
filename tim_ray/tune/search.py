"""How a sweep draws its trials' keys: trial i's keys are a function of the sweep's seed, i and (for Optuna) the
trials recorded when it is drawn, so a resumed sweep draws what the uninterrupted one would have.

Each draw builds a fresh in-memory Optuna study from the sweep's record (tim_ray.tune.state) and asks it once,
with a sampler seeded by (seed, i):
    random   RandomSampler: trial i depends on (seed, i) only.
    optuna   TPESampler: the trials that ended with an objective are told (a trial the scheduler stopped early
             with its last objective, as Ray's OptunaSearch tells it), the ones still running are added as running
             (TPE's constant liar counts them); a failed trial is left out. Its first 10 draws are random.
Nothing of the search is kept between draws, so nothing but the JSON record is needed to resume it.
"""
from __future__ import annotations

import numpy as np

from tim_ray.tune.space import Space

SEARCHES = ("optuna", "random")


def draw_seed(seed: int, index: int) -> int:
    """The sampler seed of trial `index`: independent streams per trial (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def draw(space: Space, search: str, seed: int, index: int, mode: str, trials=()) -> dict:
    """The keys of trial `index`; `trials`: the sweep's recorded trials (TrialRecord) before it, in order."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler_seed = draw_seed(seed, index)
    sampler = (optuna.samplers.TPESampler(seed=sampler_seed) if search == "optuna"
               else optuna.samplers.RandomSampler(seed=sampler_seed))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    distributions = {d.key: d.distribution() for d in space.dimensions}
    if search == "optuna":
        for record in trials:
            params = {d.key: d.to_draw(record.params[d.key]) for d in space.dimensions}
            if record.live:
                study.add_trial(create_trial(state=TrialState.RUNNING, params=params, distributions=distributions))
            elif record.status != "error" and record.objective is not None:
                study.add_trial(create_trial(params=params, distributions=distributions, value=record.objective))
    drawn = study.ask(distributions).params
    return {d.key: d.from_draw(drawn[d.key]) for d in space.dimensions}
