"""Run a study: a Ray Tune search whose trials each drive a Ray Train `TorchTrainer`.

Three layers, as in Ray's Train V2 + Tune pattern:
  Tuner (this process: OptunaSearch, ASHA, the MLflow writer)
    -> trial driver (`_run_trial`: builds and fits a TorchTrainer)
      -> training workers (`cbtlab.train.train_loop_per_worker`, DDP)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.paths import default_tracking_uri, ray_results_home
from cbtlab.tracking.report import format_table

log = logging.getLogger(__name__)


@dataclass
class StudySpec:
    """Everything a study run needs; studies/ scripts fill it from their flags."""

    name: str
    base: ExperimentConfig
    # Dotted config key -> the values to search (categorical).
    space: dict[str, list[Any]]
    # Trials to run first, in order (each a full assignment of `space`), before the sampler.
    initial_points: list[dict[str, Any]] = field(default_factory=list)
    num_samples: int = 6
    search_seed: int = 0
    metric: str = "val/top1"
    mode: str = "max"
    asha: bool = True
    # Epochs every trial runs before ASHA may stop it; None means half of train.epochs.
    grace_period: int | None = None
    reduction_factor: int = 2
    max_concurrent: int = 1
    # CPUs held by each trial's driver process (the TorchTrainer's workers hold their own).
    trial_driver_cpus: float = 0.1
    ray_address: str | None = None
    # Stream the training workers' own logs to this console (Tune's error files keep them anyway).
    worker_logs: bool = False
    storage_path: str = ""
    tracking_uri: str = ""
    experiment_name: str = ""

    def validate(self) -> StudySpec:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError("study.name", f"must be a non-empty word, got {self.name!r}")
        self.base.validate()
        if not self.space:
            raise ConfigError("study.space", "the search space is empty")
        known = set(self.base.flat())
        for key, values in self.space.items():
            if key not in known:
                raise ConfigError(key, f"not a config field; fields: {', '.join(sorted(known))}")
            if not values:
                raise ConfigError(key, "no values to search")
            for value in values:  # each value must give a valid config on its own
                self.base.with_overrides({key: value})
        for point in self.initial_points:
            if set(point) != set(self.space):
                raise ConfigError(
                    "study.initial_points", f"{point} does not assign {set(self.space)}"
                )
            self.base.with_overrides(point)
        if self.num_samples < 1:
            raise ConfigError("study.num_samples", f"must be >= 1, got {self.num_samples}")
        if self.mode not in ("max", "min"):
            raise ConfigError("study.mode", f"{self.mode!r} is not one of 'max', 'min'")
        if self.max_concurrent < 1:
            raise ConfigError("study.max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        if self.grace_period is None:
            self.grace_period = max(1, self.base.train.epochs // 2)
        if self.grace_period < 1:
            raise ConfigError("study.grace_period", f"must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError(
                "study.reduction_factor", f"must be >= 2, got {self.reduction_factor}"
            )
        self.storage_path = self.storage_path or str(ray_results_home())
        self.tracking_uri = self.tracking_uri or default_tracking_uri()
        self.experiment_name = self.experiment_name or self.name
        return self


@dataclass
class StudyResult:
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    rows: list[dict[str, Any]]
    failed: int
    mode: str = "max"

    @property
    def best(self) -> dict[str, Any] | None:
        done = [r for r in self.rows if r["best"] is not None]
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda r: r["best"]) if done else None


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a `host:port` (or `ray://host:port`) cluster address does not answer:
    `ray.init` would wait minutes for the GCS."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r} is not 'auto' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc


def connect_ray(address: str | None, *, worker_logs: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray on this machine.

    When cbtlab is imported from a source tree rather than installed (e.g. inside
    `ray job submit --working-dir .`), ship the package to the workers."""
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {}
    try:
        metadata.distribution("cbtlab")
    except metadata.PackageNotFoundError:
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parents[1])]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=worker_logs)
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner needs the State API to
        # release a finished trial's workers' resources.
        ray.init(runtime_env=runtime_env or None, log_to_driver=worker_logs)


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], storage_path: str) -> None:
    """A Tune trial: build the trial's config and fit a TorchTrainer on it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cbtlab.train import build_trainer, fit

    cfg = ExperimentConfig.from_dict(base).with_overrides(params)
    trainer = build_trainer(
        cfg,
        name=tune.get_context().get_trial_name(),
        storage_path=storage_path,
        callbacks=[TuneReportCallback()],
    )
    fit(trainer)


def run_study(spec: StudySpec) -> StudyResult:
    """Run the study to completion; log it to MLflow; return its summary rows."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cbtlab.data import open_split, prepare_dataset
    from cbtlab.tracking import StudyTracker, git_state, package_versions
    from cbtlab.tune.callbacks import MLflowTrialLogger

    spec.validate()
    tracker = StudyTracker(spec.tracking_uri, spec.experiment_name)
    # Build the dataset once on the driver; workers on this machine then find it cached.
    data_hash = open_split(prepare_dataset(spec.base.data), "train").content_hash

    git = git_state()
    tags = {
        "mlflow.source.name": sys.argv[0] or "cbtlab",
        "mlflow.source.type": "LOCAL",
        "cbtlab.study": spec.name,
        "cbtlab.data_hash": data_hash,
        **{f"cbtlab.{k}": v for k, v in git.items()},
        **{f"cbtlab.version.{k}": v for k, v in package_versions().items()},
    }
    if git["git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["git_commit"]
    parent_params = {
        **spec.base.flat(),
        "study.space": json.dumps(spec.space),
        "study.num_samples": spec.num_samples,
        "study.search_seed": spec.search_seed,
        "study.searcher": "optuna-tpe",
        "study.scheduler": (
            f"asha(grace={spec.grace_period},rf={spec.reduction_factor})" if spec.asha else "fifo"
        ),
        "study.metric": f"{spec.metric}:{spec.mode}",
    }
    connect_ray(spec.ray_address, worker_logs=spec.worker_logs)
    parent_run_id = tracker.start_run(
        spec.name,
        params=parent_params,
        tags={**tags, "cbtlab.role": "study", "cbtlab.config_hash": spec.base.config_hash()},
    )
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=parent_run_id,
        base=spec.base,
        tags={**tags, "cbtlab.role": "trial"},
        metric=spec.metric,
    )
    status = "FAILED"
    try:
        searcher = OptunaSearch(
            metric=spec.metric,
            mode=spec.mode,
            points_to_evaluate=spec.initial_points or None,
            sampler=optuna.samplers.TPESampler(seed=spec.search_seed),
        )
        scheduler = None
        if spec.asha:
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=spec.base.train.epochs,
                grace_period=min(spec.grace_period, spec.base.train.epochs),
                reduction_factor=spec.reduction_factor,
            )
        trainable = tune.with_resources(
            tune.with_parameters(
                _run_trial, base=spec.base.to_dict(), storage_path=spec.storage_path
            ),
            {"cpu": spec.trial_driver_cpus},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune.choice(values) for key, values in spec.space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent,
                trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{parent_run_id[:8]}",
                storage_path=spec.storage_path,
                callbacks=[logger],
                verbose=0,
            ),
        )
        tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.end_open_runs("KILLED" if status == "KILLED" else "FAILED")
        rows = summary_rows(logger, spec)
        failed = sum(1 for r in rows if r["status"] == "FAILED")
        if rows and failed == len(rows):
            status = "FAILED"
        result = StudyResult(
            parent_run_id, spec.tracking_uri, spec.experiment_name, rows, failed, spec.mode
        )
        table = format_table(rows, list(spec.space), spec.metric, spec.mode)
        tracker.log_text(parent_run_id, table, "summary.txt")
        tracker.log_text(parent_run_id, json.dumps(rows, indent=2), "summary.json")
        if result.best is not None:
            tracker.log_metrics(parent_run_id, {f"best/{spec.metric}": result.best["best"]}, step=0)
        tracker.set_tags(
            parent_run_id, {"cbtlab.trials": str(len(rows)), "cbtlab.failed": str(failed)}
        )
        tracker.end_run(parent_run_id, status)
    return result


def summary_rows(logger: Any, spec: StudySpec) -> list[dict[str, Any]]:
    rows = []
    for record in logger.records.values():
        flat = record.config.flat()
        rows.append(
            {
                "trial": record.name,
                **{key: flat[key] for key in spec.space},
                "representatives": record.config.model.num_representatives,
                "epochs": record.epochs,
                "final": record.last.get(spec.metric),
                "best": record.best.get(spec.metric),
                "seconds": round(record.seconds, 1),
                "status": record.status,
                "stopped_early": record.stopped_early,
                "run_id": record.run_id,
            }
        )
    return rows


def mlflow_ui_command(tracking_uri: str) -> str:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    program = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (the tracking server's UI)"
    return f"{program} ui --backend-store-uri {tracking_uri}"
