"""Stopping without losing work: a stop request from the driver, and a Ray drain of a worker's node.

- SIGTERM or SIGINT to `tim-ray train` (Ctrl-C, `kill`, `ray job stop`) sets a flag in a small Ray actor; the
  workers see it at their next check, save a checkpoint together and return, and the driver exits cleanly. A
  second signal aborts at once.
- A Ray drain of a node that hosts a worker (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
  --deadline-remaining-seconds N`, what the KubeRay preStop hook runs on a spot reclaim) shows up in
  `ray.train.get_preemption_info()`; the workers save a checkpoint at once and keep training until Ray restarts the
  group on the remaining nodes, which then resumes from that checkpoint.

Every check is a barrier across the workers (both the all-reduce and get_preemption_info), so all ranks check at
the same steps: every `checkpoint.stop_check_every` steps.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import ray
import torch
import torch.distributed as dist


@ray.remote(num_cpus=0)
class RunControl:
    """The driver's end of a run: a stop request goes down to the workers; rank 0's progress, its lines for the
    person running tim-ray and its end-of-run summary come up to the driver, which prints them (worker output
    itself reaches the driver only with --verbose). Create it with `new_run_control`."""

    def __init__(self):
        self.reason: str | None = None
        self.step: int = 0
        self.lines: list[str] = []
        self.summary: dict = {}

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason

    def report_step(self, step: int) -> None:
        self.step = step

    def say(self, line: str) -> None:
        self.lines.append(line)

    def record_summary(self, summary: dict) -> None:
        self.summary = summary

    def news(self) -> tuple[int, list[str], dict]:
        """(latest step, the lines said since the last call, the summary so far)."""
        lines, self.lines = self.lines, []
        return self.step, lines, self.summary


def tell_driver(control, line: str, run: str) -> None:
    """A line for the person running tim-ray, from a worker of run `run`: through the driver's RunControl when there
    is one, else on this process's real stdout (Ray Train patches print() in workers and, with stdout wrapped,
    would show every line twice), named by its run: a sweep's trials have no RunControl and print side by side."""
    if control is not None:
        control.say.remote(line)
    else:
        print(f"[tim-ray] {run}: {line}", file=sys.__stdout__, flush=True)


def new_run_control():
    """A RunControl on the driver's own node: placed anywhere, it could sit on a spot node and die with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return RunControl.options(scheduling_strategy=here).remote()


def on_stop_signals(control) -> None:
    """In the driver: the first SIGTERM/SIGINT asks the workers to checkpoint and stop; the second aborts.
    Python takes signals only in the main thread; a launch from another thread (a notebook, a test) has none."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        control.request_stop.remote(name)
        print(f"tim-ray train: {name}: saving a checkpoint at the next stop check, then stopping "
              f"(send it again to abort without one)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


JOB_STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # read by Ray's job supervisor; its default is 3 s
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor on the driver of a submitted job


def job_stop_warning() -> str | None:
    """A line to print when this driver is a submitted Ray job that `ray job stop` would SIGKILL 3 s after its
    SIGTERM: too soon for the workers to save the stop's checkpoint and for Ray to register it. The supervisor's
    environment (the job's runtime env) is the driver's, so what it reads can be read here."""
    if SUBMITTED_JOB_ENV not in os.environ or JOB_STOP_WAIT_ENV in os.environ:
        return None
    return (f"{JOB_STOP_WAIT_ENV} is not set in this job's runtime env, so `ray job stop` kills this driver 3 s "
            f"after asking it to stop, likely before the stop's checkpoint is saved; submit with "
            f"--runtime-env jobs/runtime_env.yaml (it sets 120)")


class StopChecks:
    """In every worker: every `every` steps, whether to save a checkpoint now and whether to stop after it."""

    def __init__(self, every: int, control, rank: int, device: torch.device, run: str):
        self.every, self.control, self.rank, self.device, self.run = every, control, rank, device, run
        self.saved_for_drain = False

    def _requested(self) -> bool:
        if self.control is None:
            return False
        try:
            return ray.get(self.control.stop_reason.remote(), timeout=30) is not None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # The driver is gone (its node with it); nobody is left to ask for a stop, so training goes on.
            self.control = None
            tell_driver(None, "the driver's run control is unreachable; stop requests are off", self.run)
            return False

    def check(self, step: int) -> tuple[bool, str | None]:
        """(save a checkpoint now, the reason to stop or None)."""
        if step % self.every:
            return False, None
        import ray.train

        requested = self.rank == 0 and self._requested()
        stop = torch.tensor([float(requested)], device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            return True, "stop requested"
        draining = ray.train.get_preemption_info()
        if draining is not None and not self.saved_for_drain:
            self.saved_for_drain = True
            tell_driver(self.control, f"node drain announced (deadline {draining.deadline_ms} ms): checkpointing at "
                                      f"step {step}", self.run)
            return True, None
        return False, None


class DriverConsole:
    """In the driver: prints what rank 0 says through the RunControl as it arrives and, when stdout is a terminal,
    keeps a progress bar with an ETA under those lines (worker output reaches the driver line by line, so a bar
    drawn in a worker would not show)."""

    POLL_S = 0.5

    def __init__(self, control, start: int, total: int, terminal: bool):
        self.control, self.done, self.summary = control, threading.Event(), {}
        self.bar = None
        if terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", desc="tim-ray train", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        try:
            step, lines, self.summary = ray.get(self.control.news.remote(), timeout=5)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return
        for line in lines:
            if self.bar is not None:
                self.bar.write(f"[tim-ray] {line}", file=sys.stdout)
            else:
                print(f"[tim-ray] {line}", flush=True)
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def _follow(self) -> None:
        while not self.done.wait(self.POLL_S):
            self._poll()

    def close(self) -> dict:
        """Stop following, print what is left, and return rank 0's end-of-run summary ({} if none came)."""
        self.done.set()
        self.thread.join(timeout=10)
        self._poll()
        if self.bar is not None:
            self.bar.close()
        return self.summary
