"""MLflow logging for studies, written from one place: the Tune driver.

`StudyTracker` is a thin writer over `MlflowClient`; the names it writes (tags, params,
metrics) are those of `cbtlab.tracking.schema`. Only the driver writes (a Tune `Callback`),
never the trial processes or the training workers, so parallel trials never contend for the
SQLite store.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cbtlab.paths import redact_url
from cbtlab.tracking.schema import PARENT_TAG, every_child_run

log = logging.getLogger(__name__)


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast on an unreachable tracking server (MlflowClient would retry for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"cannot reach the MLflow tracking server {redact_url(tracking_uri)!r}: {exc}"
        ) from exc


# Set to false (or 0) to log no system metrics (MLflow's own switch, whose default is off for
# MLflow's fluent runs; a study's trial runs log them unless it says false).
SYSTEM_METRICS_SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def start_system_metrics(tracking_uri: str, run_id: str, *, resume: bool = False) -> Any | None:
    """MLflow's system-metrics monitor on the run, started: a thread sampling this machine
    (CPU, memory, disk, network; NVIDIA GPUs when nvidia-ml-py is installed, `cbtlab[gpu]`)
    into the run's `system/...` metrics every `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`
    seconds (MLflow's default, 10), a step per sample (`resume`: after the run's last). None
    when `SYSTEM_METRICS_SWITCH` says false, or without psutil (said once)."""
    if os.environ.get(SYSTEM_METRICS_SWITCH, "").strip().lower() in ("false", "0"):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil missing
        _no_system_metrics(str(exc))
        return None
    # Its start and stop are said at INFO for every run: not in a study's output.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


@functools.cache
def _no_system_metrics(reason: str) -> None:
    """Say once per process why the trial runs get no system metrics."""
    log.warning("no system metrics in the trial runs: %s (pip install psutil)", reason)


def _store_problem(tracking_uri: str, exc: Exception) -> str:
    """One line on why the tracking store at `tracking_uri` refused to answer."""
    where = redact_url(tracking_uri)
    code = str(getattr(exc, "error_code", ""))
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or " 401" in text or " 403" in text:
        return (
            f"the MLflow tracking server {where} refused this client ({text}): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account it knows"
        )
    return f"cannot reach the MLflow tracking store {where}: {text}"


def _is_local_sqlite(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


class StudyTracker:
    """Thin, explicit wrapper over `MlflowClient` (no global active-run state)."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        check_reachable(tracking_uri)
        db = _is_local_sqlite(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
        except Exception as exc:
            raise ConnectionError(_store_problem(tracking_uri, exc)) from None
        if experiment is None:
            artifact_location = None
            if db is not None:
                artifact_location = (db.parent / "mlartifacts" / experiment_name).as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=artifact_location
            )
        else:
            self.experiment_id = experiment.experiment_id

    def start_run(
        self,
        name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = dict(tags)
        if parent_run_id is not None:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file to the run's artifacts (under its own name, in `artifact_path`)."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed study goes on writing to it)."""
        self.client.update_run(run_id, status="RUNNING")

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """The runs nested under `parent_run_id` in this experiment (every page)."""
        return every_child_run(self.client, self.experiment_id, parent_run_id)
