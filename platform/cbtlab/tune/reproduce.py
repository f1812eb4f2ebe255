"""Re-run a logged trial exactly (or with more seeds) and compare it with what it logged.

The config comes from the run's params; what may make the re-run differ (code, data, packages,
config fields) is warned about first. The re-runs go through the study's own trial path (one
Tune trial per seed, `train.seed = logged + i`, stopped where ASHA stopped the original) and are
logged as MLflow runs nested under the original (`cbtlab.role=reproduction`,
`cbtlab.reproduces=<run id>`; with several seeds under one sweep run holding their spread).
The exact re-run is tagged `cbtlab.reproduced` = identical | differs | failed: identical when
every per-epoch metric but the wall-clock ones (`time/`, `throughput/`) is within `tolerance`
of the logged one at every logged epoch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtlab.cluster import connect_ray, resolve_use_gpu
from cbtlab.config import ExperimentConfig
from cbtlab.data import dataset_hash
from cbtlab.paths import default_tracking_uri, ray_results_home
from cbtlab.tables import render_table
from cbtlab.tracking import StudyTracker, provenance_differences
from cbtlab.tracking.schema import (
    CONFIG_HASH_TAG,
    EPOCHS_TAG,
    REPRODUCED_TAG,
    REPRODUCES_TAG,
    ROLE_REPRODUCTION,
    ROLE_REPRODUCTION_SWEEP,
    ROLE_TAG,
    STUDY_TAG,
    config_from_params,
    run_params,
)
from cbtlab.tune.callbacks import MLflowTrialLogger, NoRetry
from cbtlab.tune.driver import run_tags, trial_trainable
from cbtlab.tune.orphans import PlacementGroupSweeper
from cbtlab.tune.resources import trials_that_fit
from cbtlab.tune.scheduler import EPOCH_KEY
from cbtlab.tune.spec import TRIAL_DRIVER_CPUS
from cbtlab.tune.stats import mean_ci

REPORT_FILE = "reproduction.txt"
# Per-epoch metrics a re-run must give again; time/ and throughput/ are wall-clock.
COMPARED_PREFIXES = ("train/", "val/", "data/", "rc/", "rc_norm/")


@dataclass
class MetricDiff:
    """One metric of the logged run against its re-run, over the logged epochs."""

    metric: str
    epochs: int  # logged epochs of this metric
    logged: float  # at the last logged epoch
    reproduced: float | None  # at that epoch (None: the re-run did not reach it)
    max_abs_diff: float  # over every logged epoch (inf where the re-run lacks one)
    first_epoch: int | None  # the first epoch beyond the tolerance

    @property
    def final_diff(self) -> float:
        return math.inf if self.reproduced is None else abs(self.reproduced - self.logged)


@dataclass
class SeedSpread:
    """The final value of a metric over the seeds of a reproducibility sweep."""

    metric: str
    values: dict[int, float | None]  # seed -> final value (None: the trial failed)
    mean: float
    std: float  # ddof 1; NaN below two values
    min: float
    max: float


@dataclass
class Reproduction:
    run_id: str  # the reproduced run
    runs: dict[int, str]  # seed -> the re-run's MLflow run
    warnings: list[str]
    diffs: list[MetricDiff]
    identical: bool
    tolerance: float
    report: str
    sweep_run_id: str | None = None
    spread: SeedSpread | None = None
    notes: list[str] = field(default_factory=list)


def rebuild_config(
    params: Mapping[str, str], tags: Mapping[str, str]
) -> tuple[ExperimentConfig, list[str]]:
    """The config of a logged run from its params, and what may make it differ from the
    config the run had: fields it logged that this code lacks (skipped), fields this code has
    that it did not log (defaults now), and a hash other than its `cbtlab.config_hash`."""
    cfg = config_from_params(dict(params))
    known = set(cfg.flat())
    derived = set(run_params(cfg)) - known
    sections = {key.partition(".")[0] for key in known}
    dropped = sorted(
        k for k in params if k.partition(".")[0] in sections and k not in known | derived
    )
    missing = sorted(known - set(params))
    warnings = []
    if dropped:
        warnings.append(
            "config: the run logged fields this code does not have (left out): "
            + ", ".join(f"{k}={params[k]}" for k in dropped)
        )
    if missing:
        flat = cfg.flat()
        warnings.append(
            "config: fields the run did not log, at this code's defaults: "
            + ", ".join(f"{k}={flat[k]}" for k in missing)
        )
    logged_hash = tags.get(CONFIG_HASH_TAG)
    if logged_hash and logged_hash != cfg.config_hash():
        warnings.append(
            f"config: the rebuilt config hashes to {cfg.config_hash()}, the run logged "
            f"{logged_hash}"
        )
    return cfg, warnings


def metric_histories(client: Any, run_id: str, keys: Sequence[str]) -> dict[str, dict[int, float]]:
    """metric -> {epoch: value} of a run (the last value logged at an epoch wins)."""
    histories: dict[str, dict[int, float]] = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        histories[key] = {int(m.step): float(m.value) for m in points}
    return histories


def compared_metrics(metrics: Mapping[str, float]) -> list[str]:
    return sorted(k for k in metrics if k.startswith(COMPARED_PREFIXES))


def compare_histories(
    logged: Mapping[str, Mapping[int, float]],
    reproduced: Mapping[str, Mapping[int, float]],
    tolerance: float = 0.0,
) -> list[MetricDiff]:
    """Every logged metric against the re-run's, epoch by epoch over the logged epochs."""
    diffs = []
    for metric in sorted(logged):
        steps = sorted(logged[metric])
        if not steps:
            continue
        again = reproduced.get(metric, {})
        worst, first = 0.0, None
        for step in steps:
            diff = abs(again[step] - logged[metric][step]) if step in again else math.inf
            worst = max(worst, diff)
            if first is None and diff > tolerance:
                first = step
        last = steps[-1]
        diffs.append(
            MetricDiff(metric, len(steps), logged[metric][last], again.get(last), worst, first)
        )
    return diffs


def format_diffs(diffs: Sequence[MetricDiff]) -> str:
    headers = ["metric", "epochs", "logged", "reproduced", "|diff|", "max |diff| (all epochs)",
               "first epoch off"]  # fmt: skip
    body = [
        [
            d.metric,
            str(d.epochs),
            f"{d.logged:.8g}",
            "-" if d.reproduced is None else f"{d.reproduced:.8g}",
            f"{d.final_diff:.3g}",
            f"{d.max_abs_diff:.3g}",
            "-" if d.first_epoch is None else str(d.first_epoch),
        ]
        for d in diffs
    ]
    return render_table(headers, body)


def seed_spread(metric: str, values: Mapping[int, float | None]) -> SeedSpread:
    present = [v for v in values.values() if v is not None]
    mean, std, _, _ = mean_ci(present)
    low = min(present) if present else math.nan
    high = max(present) if present else math.nan
    return SeedSpread(metric, dict(values), mean, std, low, high)


def format_spread(spread: SeedSpread) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.6g}"

    rows = [[str(seed), num(value)] for seed, value in sorted(spread.values.items())]
    rows += [[name, num(getattr(spread, name))] for name in ("mean", "std", "min", "max")]
    return render_table(["seed", f"final {spread.metric}"], rows)


@dataclass
class _LoggedRun:
    """What a reproduction reads of the run it reproduces, and the tags of its re-runs."""

    run_id: str
    name: str  # its run name (or its id's first 8 characters)
    experiment: str
    config: ExperimentConfig  # rebuilt from its params
    tags: dict[str, str]  # the re-runs' tags: its study, the data hash, provenance of now
    warnings: list[str]
    logged: dict[str, dict[int, float]]  # its compared per-epoch metrics
    epochs: int  # the epochs it completed
    stop_at: int | None  # where ASHA stopped it, if it did


def reproduce_run(
    tracking_uri: str,
    run_id: str,
    *,
    seeds: int = 1,
    tolerance: float = 0.0,
    metric: str = "val/top1",
    storage_path: str | None = None,
    ray_address: str | None = None,
    worker_logs: bool = False,
) -> Reproduction:
    """Re-run MLflow run `run_id` with its logged config and seed (and `seeds - 1` more seeds),
    log the re-runs under it, and compare the exact re-run with the logged history."""
    import ray
    from mlflow.tracking import MlflowClient

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    client = MlflowClient(tracking_uri)
    run = _read_logged_run(client, run_id)
    tracker = StudyTracker(tracking_uri, run.experiment)
    connect_ray(ray_address, worker_logs=worker_logs)
    # A logged run holds true or false (its driver resolved "auto"), kept for the exact re-run;
    # a config that still says "auto" takes this cluster's GPUs.
    cfg = resolve_use_gpu(run.config, ray.cluster_resources())
    seed_values = [cfg.train.seed + i for i in range(seeds)]
    fits = _rerun_fits(cfg, ray.cluster_resources())
    sweep = None
    if seeds > 1:
        sweep = tracker.start_run(
            f"{run.name}-reproduce-{seeds}-seeds",
            params={
                **cfg.flat(),
                "reproduce.seeds": ",".join(map(str, seed_values)),
                "reproduce.metric": metric,
                "reproduce.tolerance": tolerance,
            },
            tags={**run.tags, ROLE_TAG: ROLE_REPRODUCTION_SWEEP, REPRODUCES_TAG: run_id},
            parent_run_id=run_id,
        )
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=run_id if sweep is None else sweep,
        base=cfg,
        tags={**run.tags, ROLE_TAG: ROLE_REPRODUCTION, REPRODUCES_TAG: run_id},
        metric=metric,
    )
    tuner = _rerun_tuner(cfg, run, seed_values, fits, logger, storage_path)
    _fit_reruns(tuner, logger, tracker, sweep)
    reproduction = _compare_reruns(client, run, cfg, logger, seed_values, metric, tolerance)
    reproduction.sweep_run_id = sweep
    reproduction.report = format_report(reproduction, run.name, run.epochs if run.stop_at else None)
    _log_reproduction(tracker, reproduction, cfg.train.seed, run.epochs, metric)
    return reproduction


def _read_logged_run(client: Any, run_id: str) -> _LoggedRun:
    """The run `run_id` as a reproduction needs it; prints (stderr) the warnings on what may
    make its re-run differ before the re-run's minutes. Raises LookupError when it logged no
    per-epoch metric to compare."""
    run = client.get_run(run_id)
    name = run.info.run_name or run_id[:8]
    experiment = client.get_experiment(run.info.experiment_id).name
    cfg, warnings = rebuild_config(run.data.params, run.data.tags)
    tags = run_tags(run.data.tags.get(STUDY_TAG, experiment), dataset_hash(cfg.data))
    warnings += provenance_differences(run.data.tags, tags)
    for warning in warnings:  # now, before the re-run's minutes
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    logged = metric_histories(client, run_id, compared_metrics(run.data.metrics))
    if not logged:
        raise LookupError(f"run {run_id} logged no per-epoch metrics to compare")
    epochs = int(run.data.tags.get(EPOCHS_TAG) or max(max(h) for h in logged.values() if h))
    stop_at = epochs if 0 < epochs < cfg.train.epochs else None
    return _LoggedRun(run_id, name, experiment, cfg, tags, warnings, logged, epochs, stop_at)


def _rerun_fits(cfg: ExperimentConfig, cluster: Mapping[str, float]) -> int:
    """How many re-runs of `cfg` the cluster holds at once; a note (stderr) when none."""
    trial_cpus = TRIAL_DRIVER_CPUS + cfg.train.num_workers * cfg.train.cpus_per_worker
    trial_gpus = cfg.train.num_workers if cfg.train.use_gpu else 0
    fits = trials_that_fit(cluster, trial_cpus, trial_gpus)
    if fits < 1:
        print(
            f"note: a re-run needs {trial_cpus:g} CPUs and {trial_gpus} GPUs, more than the "
            "cluster has now: it waits for resources",
            file=sys.stderr,
            flush=True,
        )
    return fits


def _rerun_tuner(
    cfg: ExperimentConfig,
    run: _LoggedRun,
    seed_values: list[int],
    fits: int,
    logger: MLflowTrialLogger,
    storage_path: str | None,
) -> Any:
    """The Tune run of the re-runs: one trial per seed, in order, stopped where the logged
    run was stopped."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    storage = storage_path or str(ray_results_home())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())

    def trial_name(trial: Any) -> str:  # unique: Train V2 would resume a run of the same name
        return f"repro_s{trial.config['train.seed']}_{trial.trial_id}"

    seeds = len(seed_values)
    return tune.Tuner(
        trial_trainable(cfg, storage),
        param_space={"train.seed": tune.choice(seed_values)},
        tune_config=tune.TuneConfig(
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[{"train.seed": seed} for seed in seed_values],
                max_concurrent=max(1, min(seeds, fits)),
            ),
            num_samples=seeds,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"reproduce-{run.run_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            callbacks=[NoRetry(), logger, PlacementGroupSweeper()],
            # The epoch, not Tune's count of results: a restarted trial reports its
            # checkpoint's epochs again.
            stop={EPOCH_KEY: run.stop_at} if run.stop_at else None,
            verbose=0,
        ),
    )


def _fit_reruns(
    tuner: Any, logger: MLflowTrialLogger, tracker: StudyTracker, sweep: str | None
) -> None:
    """Run the re-runs; end what they left open (and the sweep run, unless they finished)."""
    status = "FAILED"
    try:
        tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.end_open_runs(status if status == "KILLED" else "FAILED")
        if sweep is not None and status != "FINISHED":
            tracker.end_run(sweep, status)


def _compare_reruns(
    client: Any,
    run: _LoggedRun,
    cfg: ExperimentConfig,
    logger: MLflowTrialLogger,
    seed_values: list[int],
    metric: str,
    tolerance: float,
) -> Reproduction:
    """The exact re-run's history against the logged one, and the spread over the seeds (its
    sweep run and report are left for the caller)."""
    by_seed = {record.config.train.seed: record for record in logger.records.values()}
    exact = by_seed.get(cfg.train.seed)
    notes = []
    if exact is None or exact.status != "FINISHED":
        diffs: list[MetricDiff] = []
        notes.append(f"the re-run with the logged seed {cfg.train.seed} did not finish")
        identical = False
    else:
        again = metric_histories(client, exact.run_id, list(run.logged))
        diffs = compare_histories(run.logged, again, tolerance)
        identical = all(d.max_abs_diff <= tolerance for d in diffs)
    spread = None
    if len(seed_values) > 1:
        finals: dict[int, float | None] = {}
        for seed in seed_values:
            record = by_seed.get(seed)
            done = record is not None and record.status == "FINISHED"
            finals[seed] = record.last.get(metric) if done else None
        spread = seed_spread(metric, finals)
    runs = {seed: record.run_id for seed, record in by_seed.items()}
    return Reproduction(
        run.run_id, runs, run.warnings, diffs, identical, tolerance, "", None, spread, notes
    )


def _log_reproduction(
    tracker: StudyTracker, r: Reproduction, logged_seed: int, epochs: int, metric: str
) -> None:
    """Tag and log the verdict on the exact re-run (if it started), the spread on the sweep
    run (then ended)."""
    exact_run = r.runs.get(logged_seed)
    if exact_run is not None:
        verdict = "identical" if r.identical else ("differs" if r.diffs else "failed")
        tracker.set_tags(exact_run, {REPRODUCED_TAG: verdict})
        if r.diffs:
            worst = max(d.max_abs_diff for d in r.diffs)
            tracker.log_metrics(exact_run, {"reproduce/max_abs_diff": worst}, step=epochs)
        tracker.log_text(exact_run, r.report, REPORT_FILE)
    if r.sweep_run_id is not None and r.spread is not None:
        tracker.log_metrics(
            r.sweep_run_id,
            {
                f"reproduce/{metric}/{k}": getattr(r.spread, k)
                for k in ("mean", "std", "min", "max")
            },
            step=0,
        )
        tracker.log_text(r.sweep_run_id, r.report, REPORT_FILE)
        tracker.end_run(r.sweep_run_id, "FINISHED")


def format_report(r: Reproduction, name: str, stopped_at: int | None) -> str:
    lines = [f"reproduction of run {r.run_id} ({name})"]
    if stopped_at:
        lines.append(f"the run was stopped early after {stopped_at} epochs; so was its re-run")
    lines += [f"warning: {w}" for w in r.warnings]
    lines += r.notes
    if r.diffs:
        lines += ["", format_diffs(r.diffs), ""]
        bound = "exactly" if r.tolerance == 0 else f"within {r.tolerance:g}"
        if r.identical:
            lines.append(f"REPRODUCED: every metric at every epoch equals the logged one {bound}")
        else:
            off = [d.metric for d in r.diffs if d.max_abs_diff > r.tolerance]
            lines.append(f"DIFFERS: not reproduced {bound}: {', '.join(off)}")
    if r.spread is not None:
        seeds = sorted(r.spread.values)
        title = f"spread over seeds {seeds} (final {r.spread.metric}):"
        lines += ["", title, format_spread(r.spread)]
    return "\n".join(lines)


def reproduce_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line of `studies/reproduce.py` (and `cbtlab reproduce`)."""
    from mlflow.exceptions import MlflowException

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Re-run a logged trial with its config and seed (and more seeds), log the "
        "re-runs under it in MLflow and compare their per-epoch metrics with the logged ones. "
        "Exit 0 when reproduced within --tolerance, 1 when not.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run-id", required=True, help="the MLflow run (a study's trial)")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ~/.cbtlab"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="re-runs with train.seed = logged + i for i < N (i = 0: the exact re-run); "
        "reports the spread of the final --metric",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest |difference| accepted per metric and epoch (0: exact, as on CPU)",
    )
    parser.add_argument("--metric", default="val/top1", help="the metric of the seed spread")
    parser.add_argument("--storage-path", default=None, help="Ray results folder or URI")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--worker-logs", action="store_true", help="show training workers' logs")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.tolerance < 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    uri = args.tracking_uri or default_tracking_uri()
    try:
        result = reproduce_run(
            uri,
            args.run_id,
            seeds=args.seeds,
            tolerance=args.tolerance,
            metric=args.metric,
            storage_path=args.storage_path,
            ray_address=args.address,
            worker_logs=args.worker_logs,
        )
    except (ConnectionError, LookupError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.report)
    for seed, rerun in sorted(result.runs.items()):
        print(f"re-run seed {seed}: MLflow run {rerun}")
    if result.sweep_run_id:
        print(f"sweep: MLflow run {result.sweep_run_id}")
    return 0 if result.identical else 1
