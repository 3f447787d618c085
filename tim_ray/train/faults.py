"""Faults injected on purpose, to check that a run survives them (tests, docs/reliability.md, a staging cluster).

Set TIM_RAY_INJECT_FAULTS on the machine that runs `tim-ray train`; the driver hands it to every worker. A
comma-separated list of:

    crash@STEP[:RANK]     rank RANK (default 0) dies abruptly (os._exit) as it starts step STEP; once per run
    nan@FIRST[-LAST]      every rank's batch is NaN at steps FIRST..LAST, so the loss and gradients are not finite

"Once per run" is kept by a marker file in the run directory, so the restarted worker group goes past the step.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "TIM_RAY_INJECT_FAULTS"
_SPEC = re.compile(r"^(crash)@(\d+)(?::(\d+))?$|^(nan)@(\d+)(?:-(\d+))?$")


class FaultSpecError(ValueError):
    """A malformed TIM_RAY_INJECT_FAULTS value."""


@dataclass(frozen=True)
class Faults:
    crashes: tuple[tuple[int, int], ...] = ()  # (step, rank)
    nan_steps: tuple[tuple[int, int], ...] = ()  # (first, last), inclusive

    @staticmethod
    def parse(text: str) -> Faults:
        crashes, nans = [], []
        for item in filter(None, (part.strip() for part in text.split(","))):
            match = _SPEC.match(item)
            if not match:
                raise FaultSpecError(f"{ENV_VAR} entry '{item}' is not crash@STEP[:RANK] or nan@FIRST[-LAST]")
            if match.group(1):
                crashes.append((int(match.group(2)), int(match.group(3) or 0)))
            else:
                first = int(match.group(5))
                nans.append((first, int(match.group(6) or first)))
        return Faults(tuple(crashes), tuple(nans))

    @staticmethod
    def from_env() -> Faults:
        return Faults.parse(os.environ.get(ENV_VAR, ""))

    def __bool__(self) -> bool:
        return bool(self.crashes or self.nan_steps)

    def before_step(self, step: int, rank: int, run_dir: Path) -> None:
        """Die here if a crash is planned for (step, rank) and has not happened in this run yet."""
        for crash_step, crash_rank in self.crashes:
            marker = run_dir / "faults" / f"crash@{crash_step}:{crash_rank}"
            if (step, rank) == (crash_step, crash_rank) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                print(f"[tim-ray] injected fault: rank {rank} crashes at step {step}", flush=True)
                os._exit(1)

    def batch(self, batch: dict, step: int) -> dict:
        """The batch, poisoned with NaN when a NaN fault covers this step."""
        if any(first <= step <= last for first, last in self.nan_steps):
            return {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return batch
