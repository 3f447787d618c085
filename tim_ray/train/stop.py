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
    """The driver's end of a run: a stop request goes down to the workers, rank 0's progress comes up to the
    driver's progress bar. Create it with `new_run_control`."""

    def __init__(self):
        self.reason: str | None = None
        self.step: int = 0

    def request_stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stop_reason(self) -> str | None:
        return self.reason

    def report_step(self, step: int) -> None:
        self.step = step

    def latest_step(self) -> int:
        return self.step


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

    def __init__(self, every: int, control, rank: int, device: torch.device):
        self.every, self.control, self.rank, self.device = every, control, rank, device
        self.saved_for_drain = False

    def _requested(self) -> bool:
        if self.control is None:
            return False
        try:
            return ray.get(self.control.stop_reason.remote(), timeout=30) is not None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # The driver is gone (its node with it); nobody is left to ask for a stop, so training goes on.
            print("[tim-ray] the driver's run control is unreachable; stop requests are off", file=sys.__stdout__,
                  flush=True)
            self.control = None
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
            print(f"[tim-ray] node drain announced (deadline {draining.deadline_ms} ms): checkpointing at step "
                  f"{step}", file=sys.__stdout__, flush=True)
            return True, None
        return False, None


class ProgressBar:
    """In the driver, when stdout is a terminal: a progress bar over the run's steps, fed by rank 0 through the
    RunControl (worker output reaches the driver line by line, so a bar drawn in a worker would not show)."""

    POLL_S = 0.5

    def __init__(self, control, start: int, total: int):
        from tqdm import tqdm

        self.control, self.done = control, threading.Event()
        self.bar = tqdm(total=total, initial=start, unit="step", desc="tim-ray train", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.done.wait(self.POLL_S):
            try:
                step = ray.get(self.control.latest_step.remote(), timeout=5)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                continue
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.bar.close()
