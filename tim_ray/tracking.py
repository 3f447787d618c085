"""MLflow, in one place. Everything tim-ray logs to MLflow goes through `Tracker`.

The driver creates the run (so its id can be printed and handed to the workers); rank 0 of the training workers logs
metrics and images into it by id. The default tracking URI is an *absolute* sqlite file in the run directory,
because Ray Train workers run in another working directory (a relative `sqlite:///mlflow.db` would land there).
With a tracking server URI (`tracking.uri = "http://..."`) the same code logs to the server.

A run directory is relocatable: the default store's artifacts live in the run directory too (`mlartifacts/`), and
MLflow records their location as an absolute URI, so a copied or moved run directory's store is re-pointed at its
own `mlartifacts/` when it is opened (`adopt_local_store`); the copy never writes into the original.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tim_ray import version
from tim_ray.config import Config, to_dict

log = logging.getLogger("tim_ray")
PARENT_RUN_TAG = "mlflow.parentRunId"
SQLITE_FILE = "mlflow.db"  # the default store's file in a run directory
RUN_ID_FILE = "mlflow_run_id"  # the id of a run directory's (latest) MLflow run
RESTARTED_FROM_TAG = "tim_ray.restarted_from"  # on a launch's run: the run id of the launch before it
ARTIFACTS_DIR = "mlartifacts"  # the default store's artifact root in a run directory
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it on the run page
# Where an MLflow store records artifact locations (MLflow 3.x schema): what `adopt_local_store` re-points.
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def tracking_uri(cfg: Config, run_dir: str | Path) -> str:
    return cfg.tracking.uri or f"sqlite:///{Path(run_dir).resolve() / SQLITE_FILE}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def browse_hint(uri: str, run_id: str | None = None, experiment_id: str | None = None) -> str:
    """How a person opens the run: a tracking server's page (run_id and experiment_id given: the run's own page),
    or the `mlflow ui` command that serves a local store (`mlflow ui --backend-store-uri http://...` fails)."""
    if is_server(uri):
        page = f"/#/experiments/{experiment_id}/runs/{run_id}" if run_id and experiment_id else ""
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri}"


def source_tags() -> dict[str, str]:
    """The code a run ran: tim-ray's version and, when tim-ray runs from a git checkout, its commit (and whether
    the checkout had uncommitted changes, which the commit then does not describe)."""
    tags = {"tim_ray.version": version()}
    checkout = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git, or a hung filesystem
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags["tim_ray.git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def adopt_local_store(run_dir: str | Path) -> str | None:
    """Re-point the default store of `run_dir` at `run_dir/mlartifacts` when it was made in another directory (the
    run directory was copied or moved): MLflow keeps absolute artifact URIs, and has no API to change them, so the
    locations are rewritten in its database. Returns the directory the store was made in, or None if it is this
    one (or there is no store yet)."""
    db = Path(run_dir) / SQLITE_FILE
    if not db.is_file():
        return None
    here = (Path(run_dir).resolve() / ARTIFACTS_DIR).as_uri()
    with closing(sqlite3.connect(db)) as conn, conn:  # the outer closes, the inner commits
        recorded = [row[0] for row in conn.execute("SELECT artifact_location FROM experiments")]
        foreign = {loc for loc in recorded if loc.endswith(f"/{ARTIFACTS_DIR}") and loc != here}
        for old in foreign:
            for table, column in _LOCATION_COLUMNS:
                conn.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                             f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                             (here, len(old) + 1, old, len(old) + 1, old + "/"))
    return str(Path(url2pathname(urlparse(min(foreign)).path)).parent) if foreign else None


def quiet_mlflow() -> None:
    """MLflow's own INFO lines ("Creating initial MLflow database tables...") off; warnings stay."""
    import mlflow  # noqa: F401  its import configures its loggers, which would reset a level set before it

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': '0.001'}, the form MLflow params take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class Tracker:
    """A handle on one MLflow run. Cheap to build from (uri, run_id) on any process; a disabled tracker does nothing."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self.previous_run_id: str | None = None  # for_launch: the earlier launch's run, and its status after
        self.previous_status: str | None = None
        self._client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @classmethod
    def for_run_dir(cls, cfg: Config, run_dir: str | Path, resuming: bool = True,
                    parent_run_id: str | None = None) -> "Tracker":
        """The run of a run directory: the one whose id `run_dir/RUN_ID_FILE` records when resuming, else a new
        one (nested under `parent_run_id` if given), whose id is then recorded there."""
        id_file = Path(run_dir) / RUN_ID_FILE
        existing = id_file.read_text().strip() if resuming and id_file.is_file() else None
        tracker = cls.create_run(cfg, run_dir, cfg.train.name, parent_run_id=parent_run_id,
                                 existing_run_id=existing)
        if tracker.enabled:
            id_file.write_text(tracker.run_id)
        return tracker

    @classmethod
    def for_launch(cls, cfg: Config, run_dir: str | Path) -> "Tracker":
        """A new run for one launch of `tim-ray train`. If the run directory records an earlier launch's run, the
        new run carries its id in RESTARTED_FROM_TAG, and an earlier run still RUNNING is closed as KILLED: its
        driver died without closing it (SIGKILL, a `ray job stop` past its wait, a lost head pod), and nothing
        else ever will. One run per launch keeps each launch's params (its world size, its overrides) true."""
        id_file = Path(run_dir) / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        tags = {RESTARTED_FROM_TAG: previous} if previous else {}
        tracker = cls.create_run(cfg, run_dir, cfg.train.name, tags=tags)
        if tracker.enabled:
            if previous:
                tracker.previous_run_id, tracker.previous_status = previous, tracker._close_if_running(previous)
            id_file.write_text(tracker.run_id)
        return tracker

    def _close_if_running(self, run_id: str) -> str:
        """Close `run_id` as KILLED if it is still RUNNING; its status afterwards, or why it cannot be read."""
        from mlflow.exceptions import MlflowException

        try:
            status = self._client.get_run(run_id).info.status
        except MlflowException as exc:  # a run of another store (tracking.uri changed), or deleted
            return f"not found in {self.uri}: {str(exc).splitlines()[0]}"
        if status != "RUNNING":
            return status
        self._client.set_terminated(run_id, status="KILLED")
        return "KILLED (was still RUNNING)"

    @classmethod
    def create_run(cls, cfg: Config, run_dir: str | Path, run_name: str, parent_run_id: str | None = None,
                   existing_run_id: str | None = None, tags: dict[str, str] | None = None) -> "Tracker":
        """Open the run for a training run: reuse `existing_run_id` on resume, else create one, logging the
        resolved config as params and as an artifact. Returns a disabled tracker when tracking is off."""
        if not cfg.tracking.enabled:
            return cls(None, None)
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg, run_dir)
        if not cfg.tracking.uri:
            adopt_local_store(run_dir)
        client = MlflowClient(tracking_uri=uri)
        if existing_run_id:
            client.update_run(existing_run_id, status="RUNNING")
            return cls(uri, existing_run_id)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            # With the default per-run sqlite store, artifacts live beside it; a server chooses its own location.
            artifacts = (Path(run_dir).resolve() / ARTIFACTS_DIR).as_uri() if not cfg.tracking.uri else None
            experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        tags = {**source_tags(), **(tags or {}), **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})}
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        tracker = cls(uri, run.info.run_id)
        tracker.log_config(cfg)
        return tracker

    def log_config(self, cfg: Config) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(flatten(to_dict(cfg)).items())]
        for start in range(0, len(params), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=params[start:start + 100])
        self._client.log_dict(self.run_id, to_dict(cfg), "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image, key: str, step: int) -> None:
        """A PIL image under a step slider in the MLflow UI."""
        if self.enabled:
            self._client.log_image(self.run_id, image, key=key, step=step)

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        if self.enabled and os.path.exists(path):
            self._client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_dir(self, path: str | Path, artifact_dir: str) -> None:
        if self.enabled:
            self._client.log_artifacts(self.run_id, str(path), artifact_dir)

    def register(self, name: str, artifact_dir: str) -> str:
        """Register the run's artifact directory as a new version of registered model `name` (created if new);
        returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(name)
        except MlflowException:
            self._client.create_registered_model(name)
        source = f"{self._client.get_run(self.run_id).info.artifact_uri}/{artifact_dir}"
        return self._client.create_model_version(name, source, run_id=self.run_id).version

    def record_parent(self, parent_run_id: str | None, tags: dict[str, str]) -> bool:
        """Set `tags` on this run, and nest it under `parent_run_id` when that run is in this store (a run whose
        weights came from it). Returns whether it was nested."""
        from mlflow.exceptions import MlflowException

        if not self.enabled:
            return False
        nested = False
        if parent_run_id:
            try:
                nested = bool(self._client.get_run(parent_run_id))
            except MlflowException:  # trained against another tracking store
                tags = {**tags, "tim_ray.init_run_id": parent_run_id}
        for key, value in {**tags, **({PARENT_RUN_TAG: parent_run_id} if nested else {})}.items():
            self._client.set_tag(self.run_id, key, value)
        return nested

    def child_runs(self) -> dict[str, str]:
        """{run name: run id} of the runs nested under this one (a sweep's trials)."""
        if not self.enabled:
            return {}
        experiment_id = self._client.get_run(self.run_id).info.experiment_id
        children = self._client.search_runs([experiment_id],
                                            filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}'")
        return {run.info.run_name: run.info.run_id for run in children}

    def browse_hint(self) -> str:
        return browse_hint(self.uri, self.run_id, self._client.get_run(self.run_id).info.experiment_id)

    @contextmanager
    def system_metrics(self, node: int = 0):
        """MLflow's own system metrics (CPU, memory, disk, network; GPU when nvidia-ml-py finds one) of this node,
        sampled every 10 s while the block runs: `system/...` for node 0, `system/node<k>/...` for the others."""
        if not self.enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a relaunch continues the run's step axis instead of writing over its first steps.
        monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri, resume_logging=True,
                                       node_id=f"node{node}" if node else None)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client.set_terminated(self.run_id, status=status)
