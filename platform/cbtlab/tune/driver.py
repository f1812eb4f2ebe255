"""The trial driver: what each Tune trial runs (builds and fits one Ray Train `TorchTrainer`
on the trial's config), and the tags every run of a study carries."""

from __future__ import annotations

import sys
from typing import Any

from cbtlab.config import DataConfig, ExperimentConfig
from cbtlab.data import open_split, prepare_dataset
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
from cbtlab.tune.callbacks import EpochReportCallback
from cbtlab.tune.spec import TRIAL_DRIVER_CPUS


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], storage_path: str) -> None:
    """A Tune trial: build the trial's config and fit a TorchTrainer on it."""
    from ray import tune

    cfg = ExperimentConfig.from_dict(base).with_overrides(params)
    trainer = build_trainer(
        cfg,
        name=tune.get_context().get_trial_name(),
        storage_path=storage_path,
        callbacks=[EpochReportCallback()],
    )
    fit(trainer)


def trial_trainable(
    base: ExperimentConfig, storage_path: str, driver_cpus: float = TRIAL_DRIVER_CPUS
) -> Any:
    """The Tune trainable of a study's trials: `_run_trial` bound to the trials' base config and
    the storage of their Train runs, holding `driver_cpus` CPUs for each trial's driver."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(_run_trial, base=base.to_dict(), storage_path=storage_path),
        {"cpu": driver_cpus},
    )


def dataset_hash(data: DataConfig) -> str:
    """The content hash of a config's dataset (the tag `cbtlab.data_hash`). Builds a built-in
    dataset on first use, so that workers on this machine then find it cached."""
    return open_split(prepare_dataset(data), "train").content_hash


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
