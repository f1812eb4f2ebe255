"""Run a study: a Ray Tune search or grid whose trials each drive a Ray Train `TorchTrainer`
(`cbtlab.tune.driver`), logged to MLflow as a parent run with one child run per trial.

`run_study` starts a study, `resume_study` goes on with one whose driver stopped; both log the
study's summary (the trial table, a grid's statistics, the best value) on the parent run and
end it, whatever happened to the trials.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtlab.cluster import connect_ray, node_resources
from cbtlab.config import ExperimentConfig
from cbtlab.data import dataset_hash
from cbtlab.paths import redact_url, unredact_url
from cbtlab.tables import format_table
from cbtlab.tracking import StudyTracker, provenance_differences
from cbtlab.tracking.schema import (
    ANSWER_JSON,
    ANSWER_TEXT,
    BASELINE_PARAM,
    BEST_CELL_TAG,
    BEST_PREFIX,
    BUDGET_METRIC,
    CELLS_PARAM,
    CONFIG_HASH_TAG,
    FAILED_TAG,
    MAX_CONCURRENT_PARAM,
    METRIC_PARAM,
    NUM_SAMPLES_PARAM,
    OPTUNA_STORAGE_PARAM,
    OPTUNA_STUDY_PARAM,
    RESUMED_TAG,
    ROLE_STUDY,
    ROLE_TAG,
    ROLE_TRIAL,
    SCHEDULER_PARAM,
    SEARCH_SEED_PARAM,
    SEARCHER_PARAM,
    SEEDS_PARAM,
    SPACE_PARAM,
    STATS_PARAM,
    STUDY_PATH_TAG,
    TRIALS_TAG,
)
from cbtlab.tune.best_model import best_trial_row, log_best_model
from cbtlab.tune.budget import Answer, common_budget, study_answer, with_budget_values
from cbtlab.tune.callbacks import MLflowTrialLogger, NoRetry
from cbtlab.tune.driver import run_tags, trial_trainable
from cbtlab.tune.importance import study_importances
from cbtlab.tune.orphans import PlacementGroupSweeper
from cbtlab.tune.progress import StudyProgress
from cbtlab.tune.resources import ResourcePlan, plan_resources
from cbtlab.tune.scheduler import StudyScheduler
from cbtlab.tune.spec import (
    MLFLOW_PARAM_CHARS,
    ConditionalSpace,
    StudySpec,
    grid_trials,
    spec_from_dict,
    spec_to_dict,
)
from cbtlab.tune.state import (
    STATE_FILE,
    StudyState,
    optuna_storage_url,
    read_study_state,
    write_study_state,
)
from cbtlab.tune.stats import Observation, cell_label, compare_cells, format_stats, write_stats
from cbtlab.tune.stores import check_study_stores, move_secrets

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    rows: list[dict[str, Any]]
    failed: int
    answer: Answer
    # The printed trial table; for a grid also its statistics (a pyarrow Table), their text
    # and where stats.parquet was written (also an artifact of the parent run).
    table: str = ""
    stats: Any = None
    stats_text: str = ""
    stats_path: str = ""
    # A conditional search's parameter importances at the budget (cbtlab.tune.importance).
    importances_text: str = ""
    # The best trial's registered MLflow model (models:/<study>/<version>), or why there is none.
    best_model: str = ""
    best_model_note: str = ""


def run_study(spec: StudySpec) -> StudyResult:
    """Run the study to completion; log it to MLflow; return its summary rows."""
    import ray

    spec.validate()
    _check_stores(spec)
    tracker = StudyTracker(spec.tracking_uri, spec.experiment_name)
    tags = run_tags(spec.name, dataset_hash(spec.base.data))
    connect_ray(spec.ray_address, worker_logs=spec.worker_logs)
    plan = plan_resources(spec, ray.cluster_resources(), node_resources())
    _say(f"study {spec.name}: {plan.summary}")
    trials = grid_trials(spec) if spec.grid else []
    if spec.grid:
        _say(
            f"study {spec.name}: a grid of {len(spec.cells)} cells x {spec.seeds} "
            f"seeds {spec.seed_values} = {len(trials)} trials; no early stopping (ASHA is off "
            "in a grid so that every cell's seeds run the same epochs)"
        )
    parent_run_id = tracker.start_run(
        spec.name,
        params=_parent_params(spec, plan, trials),
        tags={**tags, ROLE_TAG: ROLE_STUDY, CONFIG_HASH_TAG: plan.base.config_hash()},
    )
    run_name = f"{spec.name}-{parent_run_id[:8]}"
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=parent_run_id,
        base=plan.base,
        tags={**tags, ROLE_TAG: ROLE_TRIAL},
        metric=spec.metric,
        cell_keys=list(spec.space),
    )
    if spec.grid:
        tracker.log_text(parent_run_id, json.dumps(spec.cells), "cells.json")
    if spec.conditional:  # the rules of a conditional space (StudySpec.conditional)
        tracker.log_text(parent_run_id, json.dumps(spec.conditional, indent=2), "conditional.json")

    def fit() -> None:
        _fit_new_study(spec, plan, trials, tracker, logger, parent_run_id, run_name)

    return _drive(fit, spec, tracker, logger, parent_run_id, run_name, reload=False)


def _check_stores(spec: StudySpec) -> None:
    """Before the study writes anything: passwords out of its URLs (into the environment that
    their clients read, `cbtlab.tune.stores.move_secrets`), and its results storage and Optuna
    database answering (the MLflow store is checked by `StudyTracker`)."""
    spec.tracking_uri = move_secrets(spec.tracking_uri)
    spec.optuna_storage = move_secrets(spec.optuna_storage)
    check_study_stores(spec.storage_path, "" if spec.grid else spec.optuna_storage)


def _parent_params(
    spec: StudySpec, plan: ResourcePlan, trials: list[dict[str, Any]]
) -> dict[str, Any]:
    """The parent run's params: the trials' base config and the study's settings."""
    params = {
        **plan.base.flat(),
        SPACE_PARAM: json.dumps(spec.space),
        NUM_SAMPLES_PARAM: len(trials) if spec.grid else spec.num_samples,
        SEARCH_SEED_PARAM: spec.search_seed,
        SEARCHER_PARAM: "grid" if spec.grid else "optuna-tpe",
        SCHEDULER_PARAM: (
            f"asha(grace={spec.grace_period},rf={spec.reduction_factor})"
            if spec.asha and not spec.grid
            else "fifo"
        ),
        METRIC_PARAM: f"{spec.metric}:{spec.mode}",
        SEEDS_PARAM: spec.seeds,
        MAX_CONCURRENT_PARAM: plan.max_concurrent,
    }
    params[STATS_PARAM] = f"{spec.stats_test}:{spec.stats_on}"
    if spec.grid:
        cells_json = json.dumps(spec.cells)
        if len(cells_json) <= MLFLOW_PARAM_CHARS:  # else only in the artifact cells.json
            params[CELLS_PARAM] = cells_json
        params[BASELINE_PARAM] = cell_label(spec.baseline or spec.cells[0])
    return params


def _fit_new_study(
    spec: StudySpec,
    plan: ResourcePlan,
    trials: list[dict[str, Any]],
    tracker: StudyTracker,
    logger: MLflowTrialLogger,
    parent_run_id: str,
    run_name: str,
) -> None:
    """Set up the study's searcher, write its resume state, then run its Tune experiment."""
    from ray import tune

    storage_url = ""
    if spec.grid:
        searcher, num_samples, param_space = _grid_searcher(spec, plan, trials)
    else:
        # A study of its own per run (named as Tune's experiment), kept in a database so
        # that the search state outlives the driver.
        storage_url = optuna_storage_url(spec, run_name)
        searcher = _optuna_searcher(spec, run_name, storage_url)
        tracker.log_params(
            parent_run_id,
            {OPTUNA_STORAGE_PARAM: redact_url(storage_url), OPTUNA_STUDY_PARAM: run_name},
        )
        num_samples = spec.num_samples
        param_space = {key: tune.choice(values) for key, values in spec.space.items()}
        if spec.conditional:  # the searcher's define-by-run function holds the space
            param_space = {}
    state = StudyState(
        run_name,
        parent_run_id,
        spec.tracking_uri,
        spec.experiment_name,
        spec.storage_path,
        spec_to_dict(spec),
        plan.base.to_dict(),
        redact_url(storage_url),
    )
    write_study_state(state)
    tracker.set_tags(parent_run_id, {STUDY_PATH_TAG: state.path})
    _say(f"study {spec.name}: if its driver stops, go on with --resume {state.path}")
    base = plan.base
    scheduler = None
    if spec.asha and not spec.grid:
        # ASHA on the reported epoch, its decisions kept in the results folder: a resumed
        # study takes them again (cbtlab.tune.scheduler).
        scheduler = StudyScheduler(
            max_t=base.train.epochs,
            grace_period=min(spec.grace_period, base.train.epochs),
            reduction_factor=spec.reduction_factor,
        )
    tuner = tune.Tuner(
        trial_trainable(base, spec.storage_path, spec.trial_driver_cpus, worst_result(spec)),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=None if spec.grid else plan.max_concurrent,
            trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=spec.storage_path,
            callbacks=[
                NoRetry(),
                logger,
                StudyProgress(num_samples, spec.metric, spec.mode),
                PlacementGroupSweeper(),
            ],
            verbose=0,
            # A trial whose driver died (its node lost) runs again; its Train run goes on
            # from its latest checkpoint (Ray Train restarts lost workers by itself).
            failure_config=tune.FailureConfig(max_failures=base.train.max_failures),
        ),
    )
    tuner.fit()


def _grid_searcher(
    spec: StudySpec, plan: ResourcePlan, trials: list[dict[str, Any]]
) -> tuple[Any, int, dict[str, Any]]:
    """A grid's searcher, its number of samples and its param space."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    # The explicit list, in order: each point replaces one of num_samples random samples of
    # the (never sampled) choices below. Tune ignores max_concurrent_trials with this
    # searcher: it takes its own limit.
    searcher = BasicVariantGenerator(points_to_evaluate=trials, max_concurrent=plan.max_concurrent)
    param_space = {
        **{key: tune.choice(values) for key, values in spec.space.items()},
        "train.seed": tune.choice(spec.seed_values),
    }
    return searcher, len(trials), param_space


def _optuna_searcher(spec: StudySpec, run_name: str, storage_url: str) -> Any:
    """A search's seeded TPE searcher, its Optuna study `run_name` kept at `storage_url` (its
    password already moved out by `_check_stores`: Tune pickles the searcher's storage); a
    conditional space (`spec.conditional`) searched define-by-run (`ConditionalSpace`), Tune's
    param space then being empty."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # A restarted trial reports its finished epochs again (cbtlab.train.loop.run_training);
    # Optuna keeps each step's first value, as it should, and would warn for every repeat.
    warnings.filterwarnings(
        "ignore", message="The reported value is ignored because this `step", category=UserWarning
    )
    return OptunaSearch(
        space=ConditionalSpace(spec.space, spec.conditional) if spec.conditional else None,
        metric=spec.metric,
        mode=spec.mode,
        points_to_evaluate=spec.initial_points or None,
        sampler=optuna.samplers.TPESampler(seed=spec.search_seed),
        study_name=run_name,
        storage=optuna.storages.RDBStorage(storage_url),
    )


def resume_study(
    path: str, *, ray_address: str | None = None, worker_logs: bool = False
) -> StudyResult:
    """Go on with the study whose results folder (or state file) is `path`, after its driver
    stopped (killed, crashed, interrupted): `Tuner.restore(..., resume_errored=True)` keeps the
    finished trials and runs the unfinished and errored ones again, each Train run from its
    latest checkpoint; the trials go on writing to their MLflow child runs under the same
    parent run (reopened). Warns when the code, data or packages differ from the study's start.
    """
    from ray import tune

    state = read_study_state(path)
    folder = path.rstrip("/").removesuffix(STATE_FILE).rstrip("/")
    if "://" not in folder:
        folder = str(Path(folder).expanduser().resolve())
    spec = spec_from_dict(state.spec)
    spec.ray_address, spec.worker_logs = ray_address, worker_logs
    # Tune resumes from where the folder is now; the trials' Train runs are its neighbours.
    spec.storage_path = folder.rpartition("/")[0]
    spec.tracking_uri = state.tracking_uri
    spec.optuna_storage = "" if spec.grid else unredact_url(state.optuna_storage)
    spec.validate()
    _check_stores(spec)
    base = ExperimentConfig.from_dict(state.trial_base)
    tracker = StudyTracker(state.tracking_uri, state.experiment_name)
    parent = tracker.client.get_run(state.parent_run_id)
    tags = run_tags(spec.name, dataset_hash(base.data))
    for problem in provenance_differences(parent.data.tags, tags):
        _say(f"warning: this driver differs from the one that started the study: {problem}")
    connect_ray(spec.ray_address, worker_logs=spec.worker_logs)
    resumed = int(parent.data.tags.get(RESUMED_TAG, "0")) + 1
    tracker.reopen(state.parent_run_id)
    tracker.set_tags(state.parent_run_id, {RESUMED_TAG: str(resumed)})
    _say(f"study {spec.name}: resuming {folder} (parent run {state.parent_run_id})")
    # Tune restores the callback pickled when the study started, which writes the runs; this
    # one reads them back for the summary (reload=True).
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=state.parent_run_id,
        base=base,
        tags={**tags, ROLE_TAG: ROLE_TRIAL},
        metric=spec.metric,
        cell_keys=list(spec.space),
    )

    def fit() -> None:
        trainable = trial_trainable(
            base, spec.storage_path, spec.trial_driver_cpus, worst_result(spec)
        )
        tune.Tuner.restore(folder, trainable=trainable, resume_errored=True).fit()

    return _drive(fit, spec, tracker, logger, state.parent_run_id, state.run_name, reload=True)


def worst_result(spec: StudySpec) -> dict[str, float]:
    """The study's metric at its worst value, as a failing trial's last result carries it."""
    return {spec.metric: -math.inf if spec.mode == "max" else math.inf}


def _drive(
    fit: Callable[[], None],
    spec: StudySpec,
    tracker: Any,
    logger: Any,
    parent_run_id: str,
    run_name: str,
    *,
    reload: bool,
) -> StudyResult:
    """Run `fit`, then close what it left open and log the study's summary (its table, a
    grid's statistics, the best value) on the parent run, whatever happened."""
    status = "FAILED"
    try:
        fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if reload:
            logger.reattach()
        logger.end_open_runs("KILLED" if status == "KILLED" else "FAILED")
        rows = summary_rows(logger, spec)
        failed = sum(1 for r in rows if r["status"] == "FAILED")
        if rows and failed == len(rows):
            status = "FAILED"
        result = _summarise(rows, failed, spec, tracker, parent_run_id, run_name)
        if status == "FINISHED":
            _register_best_model(result, spec)
        tracker.set_tags(parent_run_id, {TRIALS_TAG: str(len(rows)), FAILED_TAG: str(failed)})
        tracker.end_run(parent_run_id, status)
    return result


def _summarise(
    rows: list[dict[str, Any]],
    failed: int,
    spec: StudySpec,
    tracker: Any,
    parent_run_id: str,
    run_name: str,
) -> StudyResult:
    """The study's answer at its budget, its table and a grid's statistics, logged on the
    parent run (summary.txt/json, answer.txt/json, stats.*, best/<metric>, the budget)."""
    answer = study_answer(
        rows,
        list(spec.space),
        metric=spec.metric,
        mode=spec.mode,
        kind=spec.stats_on,
        grid=spec.grid,
        test=spec.stats_test,
    )
    table = format_table(rows, spec.trial_keys, spec.metric, spec.mode, budget=answer.budget)
    result = StudyResult(
        parent_run_id, spec.tracking_uri, spec.experiment_name, rows, failed, answer, table
    )
    tracker.log_text(parent_run_id, table, "summary.txt")
    tracker.log_text(parent_run_id, json.dumps(rows, indent=2), "summary.json")
    tracker.log_text(parent_run_id, "\n".join(answer.lines()), ANSWER_TEXT)
    tracker.log_text(parent_run_id, json.dumps(answer.to_dict(), indent=2), ANSWER_JSON)
    if spec.grid and rows:
        _log_statistics(result, spec, tracker, run_name)
    if answer.best_value is not None:
        tracker.log_metrics(
            parent_run_id,
            {f"{BEST_PREFIX}{spec.metric}": answer.best_value, BUDGET_METRIC: answer.budget},
            step=0,
        )
        tracker.set_tags(parent_run_id, {BEST_CELL_TAG: answer.best_label})
    if spec.conditional:
        _log_importances(result, spec, tracker)
    return result


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _register_best_model(result: StudyResult, spec: StudySpec) -> None:
    """Log the answer's trial as an MLflow model on the parent run, registered under the
    study's name (`cbtlab.tune.best_model`); a failure is reported, never raised."""
    row = best_trial_row(result.answer, result.rows, list(spec.space), spec.mode)
    if row is None:
        result.best_model_note = "no best model: no trial was compared at the budget"
        return
    try:
        best = log_best_model(
            spec.tracking_uri,
            result.parent_run_id,
            row["run_id"],
            name=spec.name,
            storage_path=spec.storage_path,
        )
    except Exception as exc:  # no checkpoint (train.checkpoint_every=0), a store refusing
        result.best_model_note = f"no best model registered: {type(exc).__name__}: {exc}"
        log.warning(result.best_model_note)
        return
    result.best_model = best.uri
    _say(
        f"study {spec.name}: the best trial's model ({row['trial']}, checkpoint of epoch "
        f"{best.epoch}) is registered as {best.uri}"
    )


def study_statistics(rows: list[dict[str, Any]], spec: StudySpec) -> Any:
    """The statistics table (`cbtlab.tune.stats.compare_cells`) of a grid study's trial rows:
    a cell's value per seed is its `spec.stats_on` metric at the study's budget
    (`cbtlab.tune.budget`: the epoch every finished trial reached); failed and unfinished
    trials count as missing. Cells follow the grid's order."""
    factors = list(spec.space)
    cells = spec.cells
    order = {tuple(c.values()): i for i, c in enumerate(cells)}
    if any("at_budget" not in r for r in rows):
        with_budget_values(rows, common_budget(rows), spec.stats_on, spec.mode)
    observations = sorted(
        (Observation({k: r[k] for k in factors}, r["train.seed"], r["at_budget"]) for r in rows),
        key=lambda o: (order.get(tuple(o.cell.values()), len(order)), o.seed),
    )
    present = {tuple(o.cell.values()) for o in observations}
    baseline = spec.baseline or cells[0]
    if tuple(baseline.values()) not in present:
        raise LookupError(f"the baseline {cell_label(baseline)} ran no trial")
    budget = common_budget(rows)
    return compare_cells(
        observations,
        baseline=baseline,
        test=spec.stats_test,
        metric=f"{spec.stats_on} {spec.metric} at epoch {budget}",
    )


def _log_statistics(result: StudyResult, spec: StudySpec, tracker: Any, run_name: str) -> None:
    """Compute a grid's statistics, write stats.parquet (beside the Tune results when they are
    local) and log it, with its text table, on the parent run. A failure here is reported,
    never raised: the study's own results are already logged."""
    try:
        stats = study_statistics(result.rows, spec)
    except (LookupError, ValueError) as exc:
        result.stats_text = f"no statistics: {exc}"
        log.warning(result.stats_text)
        return
    result.stats, result.stats_text = stats, format_stats(stats)
    if "://" in spec.storage_path:  # remote Ray storage: the run's artifact is the only copy
        with tempfile.TemporaryDirectory() as tmp:
            path = write_stats(stats, Path(tmp) / "stats.parquet")
            tracker.log_artifact(result.parent_run_id, path)
    else:
        path = write_stats(stats, Path(spec.storage_path) / run_name / "stats.parquet")
        tracker.log_artifact(result.parent_run_id, path)
        result.stats_path = str(path)
    tracker.log_text(result.parent_run_id, result.stats_text, "stats.txt")


def summary_rows(logger: Any, spec: StudySpec) -> list[dict[str, Any]]:
    rows = []
    for record in logger.records.values():
        flat = record.config.flat()
        rows.append(
            {
                "trial": record.name,
                **{key: flat[key] for key in [*spec.space, "train.seed"]},
                "representatives": record.config.model.num_representatives,
                "epochs": record.epochs,
                "final": record.last.get(spec.metric),
                "best": record.best.get(spec.metric),
                "seconds": round(record.seconds, 1),
                "status": record.status,
                "stopped_early": record.stopped_early,
                "run_id": record.run_id,
                "history": dict(sorted(record.history.items())),
            }
        )
    return rows


def mlflow_ui_command(tracking_uri: str) -> str:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    program = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (the tracking server's UI)"
    return f"{program} ui --backend-store-uri {tracking_uri}"


def _log_importances(result: StudyResult, spec: StudySpec, tracker: Any) -> None:
    """A conditional search's parameter importances at the budget (`cbtlab.tune.importance`),
    logged as importances.txt/json on the parent run; a failure is reported, never raised."""
    try:
        importances = study_importances(
            result.rows,
            spec.space,
            spec.conditional,
            metric=spec.metric,
            mode=spec.mode,
            kind=spec.stats_on,
            budget=result.answer.budget,
        )
    except Exception as exc:  # the study's own results are logged already
        result.importances_text = f"no parameter importances: {exc!r}"
        log.warning(result.importances_text)
        return
    result.importances_text = importances.text()
    tracker.log_text(result.parent_run_id, result.importances_text, "importances.txt")
    tracker.log_text(result.parent_run_id, importances.to_json(), "importances.json")
