"""`cbtlab train`'s MLflow run: one run per training run (experiment `train` by default), with
the config as params, the code, package and data tags a study's trials carry, each epoch's
metrics as it ends, the latest checkpoint, system metrics, and how the run ended.

The epochs are logged live by a Ray Train callback on the run's controller (`EpochLogger`): a
restarted worker group reports its checkpoint's finished epochs again
(`cbtlab.train.loop.run_training`), and each epoch is logged once. A continued run
(`cbtlab train --name RUN`) goes on writing to the same MLflow run (its id is kept in the run's
record, `cbtlab_run.json`); its params stay those of its first start (MLflow's params do not
change), the fields that changed are a tag.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ray.train.v2.api.callback import UserCallback

from cbtlab.config import ExperimentConfig
from cbtlab.data import dataset_hash
from cbtlab.tracking import StudyTracker, provenance_tags
from cbtlab.tracking.mlflow_tracker import check_reachable, start_system_metrics
from cbtlab.tracking.schema import (
    CHECKPOINT_TAG,
    DATA_HASH_TAG,
    EPOCHS_TAG,
    ERROR_TAG,
    MLFLOW_SOURCE_NAME_TAG,
    MLFLOW_SOURCE_TYPE_TAG,
    TRIAL_METRIC_PREFIXES,
    run_params,
)
from cbtlab.train.messages import MID_EPOCH_KEY

__all__ = ["EpochLogger", "TrainRun", "check_reachable", "open_train_run"]

CONTINUED_TAG = "cbtlab.continued_with"  # the config fields a continued run changed


class EpochLogger(UserCallback):
    """Ray Train callback: each epoch's metrics into the MLflow run as the epoch ends (once),
    and the latest checkpoint as a tag. Runs in the Train controller; the MLflow client is made
    there on first use."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_id: str, logged_through: int
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id = run_id
        self.logged_through = logged_through
        self._tracker: StudyTracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if not metrics or metrics[0].get(MID_EPOCH_KEY):
            return
        result = metrics[0]
        if self._tracker is None:
            self._tracker = StudyTracker(self.tracking_uri, self.experiment)
        epoch = int(result.get("epoch", 0))
        if epoch > self.logged_through:
            logged = {k: v for k, v in result.items() if k.startswith(TRIAL_METRIC_PREFIXES)}
            self._tracker.log_metrics(self.run_id, logged, step=epoch)
            self._tracker.set_tags(self.run_id, {EPOCHS_TAG: str(epoch)})
            self.logged_through = epoch
        if checkpoint is not None:
            self._tracker.set_tags(self.run_id, {CHECKPOINT_TAG: checkpoint.path})


@dataclass
class TrainRun:
    """The MLflow run of one `cbtlab train` run, open while it trains."""

    tracker: StudyTracker
    experiment: str
    run_id: str
    logged_through: int
    monitor: Any = None

    def callback(self) -> EpochLogger:
        return EpochLogger(
            self.tracker.tracking_uri, self.experiment, self.run_id, self.logged_through
        )

    def end(self, status: str, error: str = "") -> None:
        if self.monitor is not None:
            self.monitor.finish()
        if error:
            self.tracker.set_tags(self.run_id, {ERROR_TAG: error[-5000:]})
        self.tracker.end_run(self.run_id, status)
        print(f"MLflow: run {self.run_id} in {self.tracker.tracking_uri}", flush=True)


def open_train_run(
    cfg: ExperimentConfig,
    *,
    name: str,
    tracking_uri: str,
    experiment: str,
    previous_run_id: str = "",
    changes: str = "",
) -> TrainRun:
    """The run's MLflow run: `previous_run_id`'s reopened (a continued run; `changes` tagged),
    else a new one named `name` with the config's params and the provenance tags."""
    tracker = StudyTracker(tracking_uri, experiment)
    run_id, logged_through = _existing(tracker, previous_run_id)
    if run_id:
        tracker.reopen(run_id)
        if changes:
            tracker.set_tags(run_id, {CONTINUED_TAG: changes})
    else:
        tags = {
            MLFLOW_SOURCE_NAME_TAG: sys.argv[0] or "cbtlab",
            MLFLOW_SOURCE_TYPE_TAG: "LOCAL",
            DATA_HASH_TAG: dataset_hash(cfg.data),
            **provenance_tags(),
        }
        run_id = tracker.start_run(name, params=run_params(cfg), tags=tags)
    monitor = start_system_metrics(tracking_uri, run_id, resume=logged_through > 0)
    return TrainRun(tracker, experiment, run_id, logged_through, monitor)


def _existing(tracker: StudyTracker, run_id: str) -> tuple[str, int]:
    """`run_id` and the last epoch it logged, where it is a run of this store; else ("", 0)."""
    if not run_id:
        return "", 0
    try:
        run = tracker.client.get_run(run_id)
    except Exception:  # not in this store (another tracking URI, a deleted run)
        return "", 0
    return run_id, int(run.data.tags.get(EPOCHS_TAG, "0"))
