"""Which checkpoint: the one rule that `tim-ray train` (resume), `sample`, `eval` and `export` share.

Given a run directory, use its newest complete and verified checkpoint directory, whether or not Ray registered it:
  - the candidates are its checkpoint_<step> directories (checkpoint_<step>-<n> when a step was checkpointed again
    after a fallback), newest first by (step, n);
  - complete and verified = every checksum manifest part is there and every file it lists matches
    (tim_ray.artifacts.checksums), and it has a state.json and a dcp/ directory;
  - a newer directory that is damaged or incomplete is skipped with one line that names it and the one used.
A checkpoint named explicitly (`--resume PATH`, or a checkpoint directory given to sample/eval/export) is verified
the same way and refused if it fails: it is never silently replaced by another one.

Training adds one thing (resume_point): with `--resume PATH`, the path wins over everything already on disk for the
first worker group of that launch; a group that restarts within the same launch (a failure, a resize) continues
from the newest verified checkpoint that this launch wrote, or from PATH again if it wrote none yet.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from tim_ray.artifacts.checksums import CheckpointError, verify

STATE_FILE, DCP_DIR = "state.json", "dcp"  # the same names as tim_ray.artifacts.checkpoint (which imports torch)
_NAME = re.compile(r"checkpoint_(\d+)(?:-(\d+))?")
Note = Callable[[str], None]


def _order(path: Path) -> tuple[int, int] | None:
    match = _NAME.fullmatch(path.name)
    return (int(match[1]), int(match[2] or 1)) if match else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint_* directories, newest first, complete or not."""
    found = [p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and _order(p) is not None]
    return sorted(found, key=_order, reverse=True)


def verify_checkpoint(directory: str | Path) -> Path:
    """The directory, if it is a tim-ray checkpoint whose checksums verify; else CheckpointError (one line)."""
    directory = Path(directory)
    verify(directory)
    if not (directory / STATE_FILE).is_file() or not (directory / DCP_DIR).is_dir():
        raise CheckpointError(f"{directory}: its files verify, but it is not a tim-ray checkpoint (no "
                              f"{STATE_FILE} or {DCP_DIR}/)")
    return directory


def newest_verified(run_dir: str | Path, note: Note | None = None,
                    accept: Callable[[Path], bool] | None = None) -> Path | None:
    """The newest checkpoint directory of `run_dir` that verifies (among those `accept` admits), or None. Each
    newer one that does not verify is reported through `note` as one line naming it and what is used instead."""
    skipped, found = [], None
    for directory in checkpoint_dirs(run_dir):
        if accept is not None and not accept(directory):
            continue
        try:
            found = verify_checkpoint(directory)
            break
        except CheckpointError as exc:
            skipped.append((directory, str(exc)))
    if note is not None:
        instead = f"using {found.name}" if found else "no earlier verified checkpoint"
        for directory, reason in skipped:
            note(f"skipping {directory.name}: {reason}; {instead}")
    return found


def require_newest_verified(run_dir: str | Path, note: Note | None = None) -> Path:
    """newest_verified, or a CheckpointError saying that the run has checkpoint directories but none verifies."""
    found = newest_verified(run_dir, note)
    if found is None:
        dirs = checkpoint_dirs(run_dir)
        if not dirs:
            raise CheckpointError(f"{run_dir}: no checkpoint_* directory")
        try:
            verify_checkpoint(dirs[0])
        except CheckpointError as exc:
            raise CheckpointError(f"{run_dir}: none of its {len(dirs)} checkpoint directories is complete and "
                                  f"verified (the newest: {exc})") from None
    return found


def launch_of(directory: Path) -> str | None:
    """The launch (Ray Train run) that wrote a checkpoint, from its state.json; None if unreadable."""
    try:
        return json.loads((directory / STATE_FILE).read_text())["state"].get("launch")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resume_point(run_dir: str | Path, start_from: str | None, launch: str | None, registered: bool,
                 note: Note | None = None) -> str | None:
    """The checkpoint a (re)starting worker group of `launch` loads, or None for a fresh start.

    start_from (`--resume PATH`): the newest verified checkpoint in run_dir that this launch wrote, else PATH
    itself (verified; CheckpointError if it does not). Without start_from: the newest verified checkpoint in
    run_dir. If none verifies although Ray has registered one (`registered`), that is a CheckpointError rather than
    a fresh start that would drop the run's progress; unregistered half-written directories alone start afresh."""
    if start_from:
        ours = newest_verified(run_dir, note, accept=lambda d: launch_of(d) == launch) if launch else None
        return str(ours or verify_checkpoint(start_from))
    found = newest_verified(run_dir, note)
    if found is not None:
        return str(found)
    dirs = checkpoint_dirs(run_dir)
    if registered:
        raise CheckpointError(f"no verified checkpoint to resume from in {run_dir} ({len(dirs)} checkpoint "
                              f"directories, none complete and verified); move them away to start afresh, or "
                              f"start from another checkpoint with --resume PATH")
    if dirs and note is not None:
        note(f"starting afresh: none of the {len(dirs)} checkpoint directories in {run_dir} is complete (none was "
             f"registered)")
    return None
