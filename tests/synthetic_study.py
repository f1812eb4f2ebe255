"""A study written to MLflow without Ray: the study runner's own writers (`StudyTracker`, the
Tune driver's `MLflowTrialLogger` fed with stand-in trials, `summary_rows` and the driver's
`_summarise`: the table, the answer at the budget, a grid's `stats.parquet`) produce the parent
run, the nested trial runs with their per-epoch metrics, tags and end-of-trial metrics, and the
parent's artifacts, exactly as `cbtlab.tune.runner.run_study` does; only the metric values are
made up. A search keeps its Optuna study as the runner does: Ray Tune's `OptunaSearch` (the
runner's `_optuna_searcher`, its storage `optuna.db` in the study's results folder, named in the
parent's params) suggests each trial and is told its results. `legacy=True` writes a search as
the driver did before studies compared their trials at one budget (no `study.stats` param, no
answer, no Optuna storage). Probe runs are written
as `cbtlab.analysis.interpretability.probe_run` writes them (role, nesting, rc/layer_XX and
probes/attention_layer_XX.png)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtlab.config import ExperimentConfig
from cbtlab.paths import redact_url
from cbtlab.tables import format_table
from cbtlab.tracking import StudyTracker
from cbtlab.tune.runner import _optuna_searcher, _summarise, summary_rows
from cbtlab.tune.spec import StudySpec, grid_trials
from cbtlab.tune.state import optuna_storage_url
from cbtlab.tune.stats import cell_label

TINY = {"model.depth": 2, "model.embed_dim": 24, "train.epochs": 3}


@dataclass
class FakeTrial:
    """What the MLflow callback reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    error_file: str | None = None

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


@dataclass
class Outcome:
    """How a stand-in trial goes: its epochs, whether it fails, is stopped early (by ASHA),
    logs rc, or stays running."""

    fail_after: int | None = None  # epochs reported before the trial fails
    running_after: int | None = None  # epochs reported by a trial still running
    stopped_after: int | None = None  # epochs reported before the scheduler stops it
    drop_metric: bool = False  # never reports the study metric
    rc: bool = False  # reports rc/layer_XX every epoch (train.probe_every=1)
    restarted_after: int | None = None  # restarted after this epoch, which it reports again


@dataclass
class WrittenStudy:
    uri: str
    name: str
    parent_run_id: str
    experiment_id: str
    trials: list[dict[str, Any]]  # per trial: run_id, params (the sampled keys), outcome, values
    stats_path: str = ""
    probe_run_ids: dict[str, str] = field(default_factory=dict)  # trial run id -> probe run


def value_of(cell: dict[str, Any], seed: int, epoch: int) -> float:
    """A made-up accuracy: depends on the cell, the seed and the epoch, below 1."""
    text = json.dumps(cell, sort_keys=True, default=str)
    base = 0.6 + (sum(map(ord, text)) % 23) / 100
    return min(0.99, base + 0.05 * epoch + 0.007 * ((seed * 37) % 5))


def write_study(
    tmp: Path,
    *,
    name: str = "synthetic",
    space: dict[str, list[Any]] | None = None,
    seeds: int = 2,
    grid: bool = True,
    outcomes: dict[int, Outcome] | None = None,
    finish: bool = True,
    probes: bool = True,
    uri: str | None = None,
    legacy: bool = False,
) -> WrittenStudy:
    """Write a study of `space` x `seeds` (a grid) or a one-seed search over `space` to a SQLite
    store in `tmp`. `outcomes` maps a trial's index (queue order) to how it goes; `finish=False`
    leaves the parent RUNNING, without its end-of-study artifacts; `legacy` writes a search as
    the driver did before it compared trials at one budget (see the module docstring)."""
    from cbtlab.tune.callbacks import MLflowTrialLogger

    space = space or {"model.attention": ["cbsa", "softmax"]}
    outcomes = outcomes or {}
    uri = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    base = ExperimentConfig().with_overrides(TINY)
    spec = StudySpec(
        name=name,
        base=base,
        space=space,
        seeds=seeds,
        grid=grid,
        num_samples=3,
        tracking_uri=uri,
        storage_path=str(tmp / "ray"),
    ).validate()
    points = grid_trials(spec) if spec.grid else _search_points(spec)
    tracker = StudyTracker(uri, spec.experiment_name)
    tags = {
        "cbtlab.study": name,
        "cbtlab.data_hash": "synthetic",
        "cbtlab.git_commit": "abc123",
        "cbtlab.git_dirty": "false",
        "mlflow.source.type": "LOCAL",
    }
    parent_params = {
        **base.flat(),
        "study.space": json.dumps(spec.space),
        "study.num_samples": len(points),
        "study.search_seed": 0,
        "study.searcher": "grid" if spec.grid else "optuna-tpe",
        "study.scheduler": "fifo" if spec.grid else "asha(grace=1,rf=2)",
        "study.metric": f"{spec.metric}:{spec.mode}",
        "study.seeds": spec.seeds,
        "study.max_concurrent": 1,
    }
    if spec.grid or not legacy:
        parent_params["study.stats"] = f"{spec.stats_test}:{spec.stats_on}"
    if spec.grid:
        parent_params["study.cells"] = json.dumps(spec.cells)
        parent_params["study.baseline"] = cell_label(spec.baseline or spec.cells[0])
    parent = tracker.start_run(
        name,
        params=parent_params,
        tags={**tags, "cbtlab.role": "study", "cbtlab.config_hash": base.config_hash()},
    )
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=parent,
        base=base,
        tags={**tags, "cbtlab.role": "trial"},
        metric=spec.metric,
        cell_keys=list(spec.space),
        verbose=False,
    )
    if spec.grid:
        tracker.log_text(parent, json.dumps(spec.cells), "cells.json")
    searcher = None if spec.grid or legacy else _searcher(spec, tracker, parent, points)
    written = []
    for i, point in enumerate(points):
        outcome = outcomes.get(i, Outcome())
        trial = FakeTrial(f"{i:05d}abc", dict(point))
        if searcher is not None:
            assert searcher.suggest(trial.trial_id) == point
        logger.on_trial_start(0, [], trial)
        cell = {k: v for k, v in point.items() if k != "train.seed"}
        seed = point.get("train.seed", 0)
        epochs = base.train.epochs
        if outcome.fail_after is not None:
            epochs = outcome.fail_after
        if outcome.running_after is not None:
            epochs = outcome.running_after
        if outcome.stopped_after is not None:
            epochs = outcome.stopped_after
        for epoch in range(1, epochs + 1):
            value = value_of(cell, seed, epoch)
            result = {
                "epoch": epoch,
                "training_iteration": epoch,
                "train/loss": 2.0 / epoch + 0.01 * seed,
                "train/top1": value - 0.02,
                "val/loss": 1.5 / epoch,
                "val/top5": min(1.0, value + 0.05),
                "throughput/train_img_s": 500.0 + 40 * len(str(cell)) % 300 + 3 * epoch,
                "time/epoch_s": 1.0,
            }
            if not outcome.drop_metric:
                result[spec.metric] = value
            if outcome.rc:
                for layer in range(base.model.depth):
                    result[f"rc/layer_{layer:02d}"] = 10.0 - layer - 0.1 * epoch
            logger.on_trial_result(0, [], trial, result)
            if searcher is not None and spec.metric in result:
                searcher.on_trial_result(trial.trial_id, result)
            if epoch == outcome.restarted_after:  # from its checkpoint: that epoch again
                logger.on_trial_result(0, [], trial, dict(result))
        if searcher is not None and outcome.running_after is None:  # as Tune tells it
            failed = outcome.fail_after is not None
            last = None if failed or outcome.drop_metric else result
            searcher.on_trial_complete(trial.trial_id, result=last, error=failed)
        if outcome.fail_after is not None:
            error = tmp / f"error_{i}.txt"
            error.write_text("Traceback ...\nRuntimeError: synthetic failure")
            trial.error_file = str(error)
            logger.on_trial_error(0, [], trial)
        elif outcome.running_after is None:
            logger.on_trial_complete(0, [], trial)
        record = logger.records[trial.trial_id]
        written.append({"run_id": record.run_id, "point": point, "outcome": outcome})
    study = WrittenStudy(uri, name, parent, tracker.experiment_id, written)
    if finish:
        rows = summary_rows(logger, spec)
        if legacy:  # the driver before the budget: the table and the rows, no answer
            table = format_table(rows, spec.trial_keys, spec.metric, spec.mode)
            tracker.log_text(parent, table, "summary.txt")
            tracker.log_text(parent, json.dumps(rows, indent=2), "summary.json")
        else:
            failed = sum(1 for r in rows if r["status"] == "FAILED")
            result = _summarise(rows, failed, spec, tracker, parent, name)
            study.stats_path = result.stats_path or ""
        tracker.end_run(parent, "FINISHED")
    if probes:
        study.probe_run_ids = write_probes(tracker, tmp, study, depth=base.model.depth)
    return study


def _searcher(spec: StudySpec, tracker: StudyTracker, parent: str, points: list) -> Any:
    """The search's Optuna searcher as the runner makes it (its study in `optuna.db` in the
    results folder, named in the parent's params), set to suggest `points` in order."""
    from ray import tune

    run_name = f"{spec.name}-{parent[:8]}"
    storage = optuna_storage_url(spec, run_name)
    tracker.log_params(
        parent, {"study.optuna_storage": redact_url(storage), "study.optuna_study": run_name}
    )
    spec.initial_points = [dict(p) for p in points]
    searcher = _optuna_searcher(spec, run_name, storage)
    space = {key: tune.choice(values) for key, values in spec.space.items()}
    searcher.set_search_properties(spec.metric, spec.mode, space)
    return searcher


def _search_points(spec: StudySpec) -> list[dict[str, Any]]:
    """A search's trials: every value of the first factor in turn (one seed), like the
    rep-count study's initial points; other factors cycle."""
    keys = list(spec.space)
    count = max(len(v) for v in spec.space.values()) + 1
    return [{k: spec.space[k][i % len(spec.space[k])] for k in keys} for i in range(count)]


def write_probes(
    tracker: StudyTracker, tmp: Path, study: WrittenStudy, *, depth: int
) -> dict[str, str]:
    """A probe run (as `probe_run` writes one) under the first finished trial of each cell."""
    from PIL import Image

    done: dict[str, str] = {}
    cells_seen: set[str] = set()
    for t in study.trials:
        cell = cell_label({k: v for k, v in t["point"].items() if k != "train.seed"})
        if cell in cells_seen or t["outcome"] != Outcome():
            continue
        cells_seen.add(cell)
        run = tracker.start_run(
            f"probe-{t['run_id'][:8]}",
            params={"probe.samples": 16},
            tags={
                "cbtlab.role": "probe",
                "cbtlab.probed_run": t["run_id"],
                "cbtlab.study": study.name,
            },
            parent_run_id=t["run_id"],
        )
        tracker.log_metrics(
            run, {f"rc/layer_{i:02d}": 8.0 - i * (1 + len(cell) % 3) for i in range(depth)}, 3
        )
        folder = tmp / "probe_figs" / run
        folder.mkdir(parents=True)
        for layer in range(depth):
            path = folder / f"attention_layer_{layer:02d}.png"
            shade = (40 * layer + 60, 120, 200 - 30 * layer)
            Image.new("RGB", (320, 180), shade).save(path)
            tracker.log_artifact(run, path, "probes")
        tracker.end_run(run, "FINISHED")
        done[t["run_id"]] = run
    return done


def finals(study: WrittenStudy) -> dict[str, float]:
    """The study metric each trial reported last (NaN when none), by run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study.uri)
    out = {}
    for t in study.trials:
        out[t["run_id"]] = client.get_run(t["run_id"]).data.metrics.get("val/top1", math.nan)
    return out


def cells_of(study: WrittenStudy) -> Sequence[str]:
    return list(
        dict.fromkeys(
            cell_label({k: v for k, v in t["point"].items() if k != "train.seed"})
            for t in study.trials
        )
    )
