"""Search spaces: a TOML file whose tables are config keys, each saying how a sweep draws that key.

    [transition.interval_sampler]
    choices = ["logit_normal_pair", "uniform_pair", "independent"]

    [transition.p_mean]
    uniform = [-1.2, 0.6]          # lo, hi

    [transition.dde_epsilon]
    loguniform = [0.001, 0.02]     # lo > 0

Ranges of int keys draw ints (both bounds included). Every choice and both bounds of every range are applied to the
sweep's base config by the config system before anything starts, so an unknown key, a wrong type or a value out of
range is the config system's own one-line error. Keys that would make trials incomparable, or that the sweep sets
itself, are refused (SWEEP_OWNED).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from tim_ray.config import Config, ConfigError, from_dict, to_dict

KINDS = ("choices", "uniform", "loguniform")
SWEEP_OWNED = {
    "data": "every trial trains on the same data, loaded once for the sweep",
    "ray": "it says where trials run, not what they learn",
    "tracking": "the sweep's MLflow parent run holds every trial",
    "eval": "it defines the objective that trials are compared by",
    "train.steps": "the scheduler compares trials at the same steps",
    "train.eval_every": "the scheduler compares trials at the same steps",
    "train.name": "the sweep names its trials",
    "train.output_dir": "the sweep places its trials",
}


class SpaceError(ConfigError):
    """A search space that cannot be used (exit 2)."""


@dataclass(frozen=True)
class Dimension:
    key: str  # a dotted config key, e.g. "transition.p_mean"
    kind: str  # one of KINDS
    values: tuple  # the choices, or (lo, hi)
    integer: bool  # an int key: ranges draw ints

    def distribution(self):
        """The Optuna distribution a sweep draws this key from (tim_ray.tune.search); a choice is drawn as its
        index, so any TOML value can be a choice."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choices":
            return CategoricalDistribution(tuple(range(len(self.values))))
        lo, hi = self.values
        log = self.kind == "loguniform"
        return IntDistribution(int(lo), int(hi), log=log) if self.integer else FloatDistribution(lo, hi, log=log)

    def to_draw(self, value):
        """`value` (one the key can take: `contains`) as the distribution holds it (a choice's index)."""
        if self.kind != "choices":
            return value
        return next(i for i, v in enumerate(self.values) if type(v) is type(value) and v == value)

    def from_draw(self, drawn):
        """The config value of a point of the distribution."""
        return self.values[drawn] if self.kind == "choices" else drawn

    def contains(self, value) -> bool:
        """Whether `value` is one this key can take in the space (a recorded trial's keys are checked with it)."""
        if self.kind == "choices":
            return any(type(value) is type(v) and value == v for v in self.values)
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        lo, hi = self.values
        return lo <= value <= hi


@dataclass(frozen=True)
class Space:
    dimensions: tuple[Dimension, ...]
    text: str  # the file as written, kept with the sweep so a resume can tell it was not changed

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]


def plain(value):
    """Tune may hand back numpy scalars (np.int64 is no int); the config system takes Python values."""
    return value.item() if hasattr(value, "item") else value


def apply_params(base: Config, params: dict, source: str) -> Config:
    """`base` with {dotted key: value} set, checked like a config file named `source`."""
    tree = to_dict(base)
    for key, value in params.items():
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = plain(value)
    return from_dict(tree, source)


def _owner_reason(key: str) -> str | None:
    return SWEEP_OWNED.get(key) or SWEEP_OWNED.get(key.partition(".")[0])


def _dimension(key: str, spec, base: Config, source: str) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{key} in {source} must have exactly one of {', '.join(KINDS)}, got {spec!r}")
    (kind, values), = spec.items()
    if kind == "choices":
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{key}.choices in {source} must be a non-empty list, got {values!r}")
    else:
        numbers = isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or not values[0] < values[1]:
            raise SpaceError(f"{key}.{kind} in {source} must be [lo, hi] with lo < hi, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise SpaceError(f"{key}.loguniform in {source} needs lo > 0, got {values!r}")
    for value in values:  # the config system judges each value: unknown key, type, range
        try:
            apply_params(base, {key: value}, source)
        except ConfigError as exc:
            where = "" if source in str(exc) else f" (from {key}.{kind} in {source})"
            raise SpaceError(f"{exc}{where}") from None
    section, _, name = key.partition(".")
    current = getattr(getattr(base, section), name)
    return Dimension(key, kind, tuple(values), isinstance(current, int) and not isinstance(current, bool))


def load_space(path: str | Path, base: Config) -> Space:
    """The space in `path`, checked against the sweep's base config."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file '{path}' does not exist")
    text = path.read_text()
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpaceError(f"{path} is not valid TOML: {exc}") from None
    dimensions = []
    for section, body in tree.items():
        if not isinstance(body, dict) or not all(isinstance(spec, dict) for spec in body.values()):
            raise SpaceError(f"{path}: every entry must be a table [section.key] holding one of "
                             f"{', '.join(KINDS)}; '{section}' is not")
        for name, spec in body.items():
            key = f"{section}.{name}"
            reason = _owner_reason(key)
            if reason:
                raise SpaceError(f"{key} in {path} cannot be swept: {reason}")
            dimensions.append(_dimension(key, spec, base, str(path)))
    if not dimensions:
        raise SpaceError(f"{path} sweeps nothing: add a table per config key, e.g. [transition.p_mean] "
                         f"uniform = [-1.0, 0.5]")
    return Space(tuple(dimensions), text)
