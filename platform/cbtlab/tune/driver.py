"""The trial driver: what each Tune trial runs (builds and fits one Ray Train `TorchTrainer`
on the trial's config), and the tags every run of a study carries."""

from __future__ import annotations

import sys
from typing import Any

from cbtlab.config import ExperimentConfig
from cbtlab.tracking import provenance_tags
from cbtlab.tracking.schema import (
    DATA_HASH_TAG,
    GIT_COMMIT_TAG,
    MLFLOW_GIT_COMMIT_TAG,
    MLFLOW_SOURCE_NAME_TAG,
    MLFLOW_SOURCE_TYPE_TAG,
    STUDY_TAG,
)
from cbtlab.train import build_trainer, fit
from cbtlab.train.messages import DeterministicFailure, Diverged
from cbtlab.tune.callbacks import NO_RETRY_KEY, EpochReportCallback
from cbtlab.tune.spec import TRIAL_DRIVER_CPUS


def _run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    storage_path: str,
    failed_result: dict[str, float] | None = None,
) -> None:
    """A Tune trial: build the trial's config and fit a TorchTrainer on it. `failed_result`
    goes with the note that a failing trial must not run again (Tune wants the study's metric
    in every result: its worst value)."""
    from ray import tune

    cfg = ExperimentConfig.from_dict(base).with_overrides(params)
    trainer = build_trainer(
        cfg,
        name=tune.get_context().get_trial_name(),
        storage_path=storage_path,
        callbacks=[EpochReportCallback()],
    )
    try:
        fit(trainer)
    except (Diverged, DeterministicFailure):
        # A bad value fails every restart the same way: the study's driver is told not to run
        # this trial again (`NoRetry`) before the error reaches it.
        tune.report({**(failed_result or {}), NO_RETRY_KEY: 1.0})
        raise
    _hand_over_last_report()


# Seconds a finished trial waits for Tune to take its last epoch's result.
HANDOVER_TIMEOUT_S = 600.0


def _hand_over_last_report(timeout_s: float = HANDOVER_TIMEOUT_S) -> None:
    """Return only once Tune's trial actor has taken the Train run's last report.

    Ray 2.60's Tune session passes a Train controller's reports through a one-slot actor queue
    that the trial actor's main thread empties, checking it before its own one-slot result
    queue. When the trial function returns while the last report still waits in the actor
    queue, the function's end fills the result queue first, and the main thread then blocks
    forever putting that report into it (`_TrainSession._get_result_from_queues`): the trial,
    and so the study, hangs after its last epoch. Seen on the two-node drill of
    docs/cluster.md with two of four trials, stack traced with py-spy. Two empty items put
    after the run (which the main thread skips) return only once it has come back for the
    second, that is, after it handed the last report over."""
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None) if session is not None else None
    if queue is None:  # no controller reported through it
        return
    try:
        for _ in range(2):
            queue.put({}, block=True, timeout=timeout_s)
    except Exception:  # the queue gone with a stopping trial, or the wait too long: go on
        return


def trial_trainable(
    base: ExperimentConfig,
    storage_path: str,
    driver_cpus: float = TRIAL_DRIVER_CPUS,
    failed_result: dict[str, float] | None = None,
) -> Any:
    """The Tune trainable of a study's trials: `_run_trial` bound to the trials' base config and
    the storage of their Train runs, holding `driver_cpus` CPUs for each trial's driver;
    `failed_result` as `_run_trial` takes it."""
    from ray import tune

    trial = tune.with_parameters(
        _run_trial, base=base.to_dict(), storage_path=storage_path, failed_result=failed_result
    )
    return tune.with_resources(trial, {"cpu": driver_cpus})


def run_tags(study: str, data_hash: str) -> dict[str, str]:
    """The tags of every run a study writes: its name, the data hash, code and packages."""
    tags = {
        MLFLOW_SOURCE_NAME_TAG: sys.argv[0] or "cbtlab",
        MLFLOW_SOURCE_TYPE_TAG: "LOCAL",
        STUDY_TAG: study,
        DATA_HASH_TAG: data_hash,
        **provenance_tags(),
    }
    if tags[GIT_COMMIT_TAG] != "unknown":
        tags[MLFLOW_GIT_COMMIT_TAG] = tags[GIT_COMMIT_TAG]
    return tags
