"""System metrics in the trial runs: the study's MLflow callback runs MLflow's own monitor on
each open trial run (no Ray: stand-in trials, as in synthetic_study.py), stops it as the run
ends, never pickles it, and goes without it when switched off or when psutil is missing."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ExperimentConfig
from cbtlab.tracking import StudyTracker
from cbtlab.tune.callbacks import MLflowTrialLogger
from synthetic_study import TINY, FakeTrial

SYSTEM_METRIC = "system/cpu_utilization_percentage"


def _trial(tmp_path: Path, seconds: float) -> tuple[MlflowClient, str, MLflowTrialLogger]:
    """A trial run open `seconds` (sampled every 0.2 s), one epoch reported, then finished."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "system")
    parent = tracker.start_run("system", params={}, tags={})
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=parent,
        base=ExperimentConfig().with_overrides(TINY),
        tags={},
        metric="val/top1",
        verbose=False,
    )
    trial = FakeTrial("00000abc", {})
    logger.on_trial_start(0, [], trial)
    run_id = logger.records[trial.trial_id].run_id
    copy = pickle.loads(pickle.dumps(logger))  # as Tune saves its callbacks: no monitor in it
    assert copy._monitors == {} and copy.records[trial.trial_id].run_id == run_id
    time.sleep(seconds)
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val/top1": 0.5, "train/loss": 1.0})
    logger.on_trial_complete(0, [], trial)
    assert logger._monitors == {}
    return MlflowClient(uri), run_id, logger


def test_trial_runs_log_this_machines_system_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client, run_id, _ = _trial(tmp_path, 1.5)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, SYSTEM_METRIC)
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert all(0 <= m.value <= 100 for m in history)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    count = len(history)
    time.sleep(0.6)  # stopped with the run: no sample after it ended
    assert len(client.get_metric_history(run_id, SYSTEM_METRIC)) == count


@pytest.mark.parametrize("why", ["switched off", "no psutil"])
def test_no_system_metrics_when_off_or_without_psutil(
    why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    if why == "switched off":
        monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    else:  # what `import psutil` inside MLflow's monitor raises where psutil is not installed
        monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    client, run_id, _ = _trial(tmp_path, 0.6)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val/top1"] == 0.5
    assert not [k for k in run.data.metrics if k.startswith("system/")]
