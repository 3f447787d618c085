"""What of Ray's output a tim-ray command shows: by default tim-ray's own lines only, with `--verbose` all of it.

Ray prints two streams in the driver: the stdout/stderr of every worker and actor (forwarded when
ray.init(log_to_driver=True): Ray Train's controller, Ray Data's operators, text encoders' "Loading weights" bars,
core_worker.cc lines) and the messages the raylets and the autoscaler publish on the cluster's error channel
("(raylet) N PYTHON worker processes have been started ...", OOM kills), which Ray prints whatever log_to_driver
says. Both end in ray._private.worker.print_to_stdstream. log_to_driver=False alone would drop tim-ray's own worker
lines too: a Tune trial's progress lines are printed by its rank-0 worker (tim_ray.train.stop.tell_driver) and
reach the driver only this way. So the forwarding stays on, and `quiet_ray_output` puts a filter in front of
print_to_stdstream: quiet, only lines that carry TAG pass (printed without Ray's "(pid=...)" prefix and without
Ray's cross-process deduplication, which would merge two trials' progress lines); verbose, everything as Ray prints
it. Ray's Python loggers in the driver print warnings and errors only when quiet. Everything dropped is still in
Ray's log files (<temp dir>/session_latest/logs).
"""
from __future__ import annotations

import logging

TAG = "[tim-ray] "  # the prefix of every line tim-ray's workers print for the person running the command

_show_all = True  # what the installed filter lets through; switched by quiet_ray_output


def _tim_ray_lines(data: dict) -> list[str]:
    return [line[line.index(TAG):] for line in data.get("lines", []) if TAG in line]


def _install() -> bool:
    """Wrap ray._private.worker.print_to_stdstream once per process. False when this Ray has no such function
    (another Ray version): the caller falls back to log_to_driver=False."""
    from ray._private import worker as ray_worker

    if getattr(ray_worker, "_tim_ray_filtered", False):
        return True
    original = getattr(ray_worker, "print_to_stdstream", None)
    show = getattr(ray_worker, "print_worker_logs", None)
    if original is None or show is None:
        return False

    def print_to_stdstream(data, ignore_prefix: bool):
        if _show_all:
            return original(data, ignore_prefix)
        lines = _tim_ray_lines(data)
        if lines:
            import sys

            show({**data, "lines": lines}, sys.stderr if data.get("is_err") else sys.stdout, ignore_prefix=True)

    # ray.init binds the module's print_to_stdstream when it connects, and the error-channel listener looks it up
    # at each message: replacing the module attribute before ray.init covers both.
    ray_worker.print_to_stdstream = print_to_stdstream
    ray_worker._tim_ray_filtered = True
    return True


def quiet_ray_output(verbose: bool) -> dict:
    """Set what this process shows of Ray before ray.init; returns the ray.init keyword arguments that go with it."""
    global _show_all
    from tim_ray.tracking import quiet_mlflow

    level = logging.INFO if verbose else logging.WARNING
    filtered = _install()
    _show_all = verbose
    if not verbose:
        # Ray Data's logger has a handler of its own: the level set through ray.init does not reach it.
        logging.getLogger("ray.data").setLevel(level)
        # "Token authentication is enabled for this Ray cluster", a warning at every start of a local Ray.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        quiet_mlflow()
    return {"log_to_driver": verbose or filtered, "logging_level": level}
