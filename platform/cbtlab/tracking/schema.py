"""The MLflow schema of cbtlab: every tag, param and metric name its runs carry, the params <->
config conversions, and the one reader of a logged study.

Runs: an experiment per study name; one parent run per study invocation (`cbtlab.role=study`);
one child run per trial under it (`mlflow.parentRunId`, `cbtlab.role=trial`); probe and
reproduction runs nest under the trial they probe or re-run. A run's params are its flattened
config plus derived values (`run_params`); metrics are logged per epoch with `step = epoch`.

Readers: `find_parent` and `load_study` (a study's parent, its trials, their probes and
histories, as `StudyRuns`), `study_from_mlflow` (the summary rows of a study) and
`record_from_run` (a trial run as the driver's `TrialRecord`, for a resumed study).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cbtlab.config import ExperimentConfig

# Tags. MLflow's own:
PARENT_TAG = "mlflow.parentRunId"
MLFLOW_SOURCE_NAME_TAG = "mlflow.source.name"
MLFLOW_SOURCE_TYPE_TAG = "mlflow.source.type"
MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"
# cbtlab's, all under one prefix:
TAG_PREFIX = "cbtlab."
ROLE_TAG = f"{TAG_PREFIX}role"  # what a run is: one of the ROLE_* values below
STUDY_TAG = f"{TAG_PREFIX}study"  # the study's name, on every run a study writes
TRIAL_TAG = f"{TAG_PREFIX}trial_id"  # a trial run's Ray Tune trial id
CHECKPOINT_TAG = f"{TAG_PREFIX}checkpoint"  # a trial's latest checkpoint (a folder or URI)
CONFIG_HASH_TAG = f"{TAG_PREFIX}config_hash"
DATA_HASH_TAG = f"{TAG_PREFIX}data_hash"
GIT_COMMIT_TAG = f"{TAG_PREFIX}git_commit"  # TAG_PREFIX + a key of `git_state()`
GIT_DIRTY_TAG = f"{TAG_PREFIX}git_dirty"
VERSION_TAG_PREFIX = f"{TAG_PREFIX}version."  # + a package name: its version
SEED_TAG = f"{TAG_PREFIX}seed"
CELL_TAG = f"{TAG_PREFIX}cell"  # a trial's values of the searched keys (its cell)
EPOCHS_TAG = f"{TAG_PREFIX}epochs_completed"
STOPPED_EARLY_TAG = f"{TAG_PREFIX}stopped_early"  # "true" | "false"
ERROR_TAG = f"{TAG_PREFIX}error"  # the end of a failed trial's error
STUDY_PATH_TAG = f"{TAG_PREFIX}study_path"  # a study's results folder (to resume it)
RESUMED_TAG = f"{TAG_PREFIX}resumed"  # how many times a study was resumed
TRIALS_TAG = f"{TAG_PREFIX}trials"  # a study's trial count, set as it ends
FAILED_TAG = f"{TAG_PREFIX}failed"  # a study's failed trial count, set as it ends
BEST_CELL_TAG = f"{TAG_PREFIX}best_cell"  # a study's answer: its best cell at the budget
# The registered MLflow model of a study's best trial (cbtlab.tune.best_model), on its parent
# run: models:/<study>/<version>; the model version's tags name the trial run, the checkpoint
# and the epoch it was saved after.
BEST_MODEL_TAG = f"{TAG_PREFIX}best_model"
MODEL_TRIAL_RUN_TAG = f"{TAG_PREFIX}trial_run"
MODEL_CHECKPOINT_TAG = CHECKPOINT_TAG
MODEL_EPOCH_TAG = f"{TAG_PREFIX}checkpoint_epoch"
PROBED_RUN_TAG = f"{TAG_PREFIX}probed_run"  # a probe run's probed trial run
REPRODUCES_TAG = f"{TAG_PREFIX}reproduces"  # a re-run's original run
REPRODUCED_TAG = f"{TAG_PREFIX}reproduced"  # an exact re-run's verdict
REPRODUCED_VALUES = ("identical", "differs", "failed")

# The values of ROLE_TAG.
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
ROLE_PROBE = "probe"
ROLE_REPRODUCTION = "reproduction"
ROLE_REPRODUCTION_SWEEP = "reproduction_sweep"

# Params besides the flattened config. A trial run's derived value:
REPRESENTATIVES_PARAM = "model.num_representatives"
# A study's parent run:
SPACE_PARAM = "study.space"  # JSON: the searched keys and their domains
METRIC_PARAM = "study.metric"  # "<metric>:<max|min>"
SEARCHER_PARAM = "study.searcher"  # "grid" | "optuna-tpe"
STATS_PARAM = "study.stats"  # "<test>:<final|best>" (searches too since issue 21)
BASELINE_PARAM = "study.baseline"  # a grid's baseline cell
CELLS_PARAM = "study.cells"  # a grid's cells, JSON (when short enough for a param)
NUM_SAMPLES_PARAM = "study.num_samples"
SEARCH_SEED_PARAM = "study.search_seed"
SCHEDULER_PARAM = "study.scheduler"  # "asha(grace=G,rf=R)" | "fifo"
SEEDS_PARAM = "study.seeds"
MAX_CONCURRENT_PARAM = "study.max_concurrent"
OPTUNA_STORAGE_PARAM = "study.optuna_storage"  # a search's Optuna storage, password hidden
OPTUNA_STUDY_PARAM = "study.optuna_study"

# Metrics. Per epoch, a trial logs those under these prefixes:
TRIAL_METRIC_PREFIXES = (
    "train/",
    "val/",
    "throughput/",
    "time/",
    "perf/",
    "data/",
    "rc/",
    "rc_norm/",
    # a segmentation run's costs, model/decoder_flops the x of its Pareto figure
    "model/",
)
# Metrics whose best value over the epochs is kept (lower is better for losses), as best/<key>.
BEST_TRACKED = ("val/top1", "val/top5", "val/loss", "val/miou", "val/pixel_acc")
BEST_PREFIX = "best/"
# A study's answer (cbtlab.tune.budget) on its parent run: the epoch its trials were compared
# at, beside best/<metric> (a grid's best cell's mean there, a search's best trial's value).
BUDGET_METRIC = "best/budget_epoch"
ANSWER_TEXT = "answer.txt"
ANSWER_JSON = "answer.json"
# A trial's wall time, logged once as it ends.
TIME_KEY = "time/trial_s"
# Metrics read per epoch by `load_study` besides the study's own metric.
HISTORY_METRICS = ("train/loss", "throughput/train_img_s")
MAX_RESULTS = 50_000


def run_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """MLflow params of a run: the flat config plus derived values."""
    return {**cfg.flat(), REPRESENTATIVES_PARAM: cfg.model.num_representatives}


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The experiment config of a trial: the study's base with the sampled dotted keys."""
    return base.with_overrides(params)


def config_from_params(params: dict[str, str]) -> ExperimentConfig:
    """The experiment config of an MLflow run from its params (the flattened config; derived
    values such as `model.num_representatives` and study settings are skipped)."""
    known = set(ExperimentConfig.keys())
    return ExperimentConfig.from_flat({k: v for k, v in params.items() if k in known})


def parse_metric(params: dict[str, str]) -> tuple[str, str]:
    """(metric, mode) of a study's parent run params; val/top1 and max when not logged."""
    metric, _, mode = params.get(METRIC_PARAM, "val/top1:max").rpartition(":")
    return (metric or "val/top1"), (mode if mode in ("max", "min") else "max")


def parse_value_kind(params: dict[str, str]) -> str:
    """Which value of the metric a study's parent run params compare its trials on ("final"
    or "best", from `study.stats`): a grid's default "final"; a search logged before
    `study.stats` was logged for searches, its trials' "best"."""
    grid = params.get(SEARCHER_PARAM) == "grid"
    kind = params.get(STATS_PARAM, "auto:final" if grid else "auto:best").rpartition(":")[2]
    return kind if kind in ("final", "best") else "final"


def child_runs(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    *,
    order_by: list[str] | None = None,
    max_results: int = MAX_RESULTS,
) -> list[Run]:
    """The runs nested under `parent_run_id` in the experiment."""
    return client.search_runs(
        [experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        order_by=order_by,
        max_results=max_results,
    )


def every_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """The runs nested under `parent_run_id` in the experiment, every page of them."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of a run's metric in step order, one point per step: the latest written."""
    points = client.get_metric_history(run_id, key)
    latest: dict[int, tuple[int, float]] = {}
    for m in points:
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


@dataclass
class TrialRecord:
    """What the study's summary needs to know about one trial."""

    trial_id: str
    name: str
    config: ExperimentConfig
    run_id: str
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    epochs: int = 0
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    status: str = "RUNNING"
    stopped_early: bool = False
    error: str = ""
    # The epochs logged so far (a run re-attached from MLflow by a resumed study: those it had
    # logged), not logged again when a restarted trial reports them anew; and, re-attached, the
    # trial time it had recorded.
    logged_through: int = 0
    prior_seconds: float = 0.0
    reattached: bool = False
    # The study metric per epoch, {epoch: value} (the budget comparisons read it).
    history: dict[int, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.prior_seconds + (self.ended or time.monotonic()) - self.started


def record_from_run(client: MlflowClient, run: Run, metric: str = "val/top1") -> TrialRecord | None:
    """The TrialRecord of a trial's MLflow run as logged so far (None: not a trial run): its
    config from the params, epochs and best values from the metric histories, the study
    `metric` per epoch, status and recorded time. A run still RUNNING is one whose driver died
    mid-trial."""
    tags, metrics = run.data.tags, run.data.metrics
    trial_id = tags.get(TRIAL_TAG)
    if not trial_id:
        return None
    epochs, best = 0, {}
    for key in BEST_TRACKED:
        history = client.get_metric_history(run.info.run_id, key)
        if not history:
            continue
        epochs = max(epochs, *(m.step for m in history))
        pick = min if key.endswith("loss") else max
        best[key] = pick(m.value for m in history)
    status = run.info.status
    per_epoch = {k: v for k, v in metrics.items() if k.startswith(TRIAL_METRIC_PREFIXES)}
    per_epoch.pop(TIME_KEY, None)
    record = TrialRecord(
        trial_id,
        run.info.run_name or f"trial_{trial_id}",
        config_from_params(run.data.params),
        run.info.run_id,
        epochs=epochs,
        last=per_epoch,
        best=best,
        status=status,
        stopped_early=tags.get(STOPPED_EARLY_TAG) == "true",
        error=tags.get(ERROR_TAG, ""),
        logged_through=epochs,
        prior_seconds=metrics.get(TIME_KEY, 0.0),
        reattached=True,
        history=dict(metric_history(client, run.info.run_id, metric)),
    )
    if status != "RUNNING":
        record.ended = record.started
    return record


def find_parent(client: MlflowClient, study: str | None, parent_run_id: str | None) -> Run:
    """The study's parent run: `parent_run_id`, else the latest run tagged as the study `study`
    (looked up in the experiment of that name first, then in every experiment)."""
    if parent_run_id:
        return client.get_run(parent_run_id)
    if not study:
        raise ValueError("give a study name or a parent run id")
    query = f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}' and tags.`{STUDY_TAG}` = '{study}'"
    order = ["attributes.start_time DESC"]
    named = client.get_experiment_by_name(study)
    if named is not None:
        found = client.search_runs([named.experiment_id], query, order_by=order, max_results=1)
        if found:
            return found[0]
    ids = every_experiment_id(client)
    found = client.search_runs(ids, query, order_by=order, max_results=1) if ids else []
    if not found:
        raise LookupError(f"no study run named {study!r} at {client.tracking_uri}")
    return found[0]


def every_experiment_id(client: MlflowClient) -> list[str]:
    """The ids of every experiment in the store, page by page (a tracking server caps a page)."""
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def find_search_parent(client: MlflowClient, study: str | None = None) -> Run:
    """The parent run of the latest Optuna search (`study.searcher` = optuna-tpe) of the study
    `study`, or of any study when None: the run whose params name its Optuna storage."""
    query = f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}' and params.`{SEARCHER_PARAM}` = 'optuna-tpe'"
    if study:
        query += f" and tags.`{STUDY_TAG}` = '{study}'"
    ids = every_experiment_id(client)
    order = ["attributes.start_time DESC"]
    found = client.search_runs(ids, query, order_by=order, max_results=1) if ids else []
    if not found:
        named = f" named {study!r}" if study else ""
        raise LookupError(f"no Optuna search{named} at {client.tracking_uri}")
    return found[0]


@dataclass
class StudyRuns:
    """One study read from MLflow."""

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent: Run
    name: str  # the study's name (tag cbtlab.study, else the parent run's name)
    factors: list[str]  # the searched config keys
    metric: str
    mode: str  # "max" or "min"
    grid: bool
    value_kind: str  # "final" or "best": which value of the metric `value` holds
    trials: list[Run]  # in start order
    probes: dict[str, Run] = field(default_factory=dict)  # trial run id -> latest probe run
    # run id -> metric key -> [(step, value)] in step order
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    artifacts: set[str] = field(default_factory=set)  # the parent run's top-level artifacts
    notes: list[str] = field(default_factory=list)

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id

    @property
    def baseline(self) -> str:
        return self.parent.data.params.get(BASELINE_PARAM, "")


def load_study(
    tracking_uri: str, study: str | None = None, parent_run_id: str | None = None
) -> StudyRuns:
    """Read a study (its latest invocation unless `parent_run_id` is given) from MLflow: its
    parent run, its trial runs in start order, the latest finished probe run of each trial and
    the trials' histories of the study metric and `HISTORY_METRICS`.

    The value a trial stands for (`value_kind`, taken at the study's budget, see
    `cbtlab.tune.budget`): the `study.stats` value (`final` by default for a grid); a search
    logged before searches logged `study.stats` stands for its best value."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, study, parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    params, tags = parent.data.params, parent.data.tags
    notes: list[str] = []
    if tags.get(ROLE_TAG, ROLE_STUDY) != ROLE_STUDY:
        notes.append(
            f"run {parent.info.run_id} is not a study's parent run (role {tags[ROLE_TAG]})"
        )
    metric, mode = parse_metric(params)
    grid = params.get(SEARCHER_PARAM) == "grid"
    value_kind = parse_value_kind(params)
    trials = _trial_runs(client, experiment.experiment_id, parent.info.run_id)
    try:
        factors = list(json.loads(params[SPACE_PARAM]))
    except (KeyError, ValueError):
        factors = _varying_params(trials)
        notes.append(
            f"the parent run has no {SPACE_PARAM} param: the factors are the params that vary "
            f"between trials ({', '.join(factors) or 'none'})"
        )
    histories = {
        t.info.run_id: {
            key: metric_history(client, t.info.run_id, key)
            for key in dict.fromkeys((metric, *HISTORY_METRICS))
        }
        for t in trials
    }
    return StudyRuns(
        tracking_uri=tracking_uri,
        experiment_id=experiment.experiment_id,
        experiment_name=experiment.name,
        parent=parent,
        name=tags.get(STUDY_TAG) or parent.info.run_name or parent.info.run_id,
        factors=factors,
        metric=metric,
        mode=mode,
        grid=grid,
        value_kind=value_kind,
        trials=trials,
        probes=_probe_runs(client, experiment.experiment_id, {t.info.run_id for t in trials}),
        histories=histories,
        artifacts={a.path for a in client.list_artifacts(parent.info.run_id)},
        notes=notes,
    )


def _trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """The trial runs under a study's parent run, in start order."""
    trials = child_runs(
        client, experiment_id, parent_run_id, order_by=["attributes.start_time ASC"]
    )
    trials = [t for t in trials if t.data.tags.get(ROLE_TAG, ROLE_TRIAL) == ROLE_TRIAL]
    trials.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return trials


def _probe_runs(client: MlflowClient, experiment_id: str, trial_ids: set[str]) -> dict[str, Run]:
    """Trial run id -> the latest finished probe run of that trial."""
    probes: dict[str, Run] = {}
    if not trial_ids:
        return probes
    for run in client.search_runs(
        [experiment_id],
        f"tags.`{ROLE_TAG}` = '{ROLE_PROBE}'",
        order_by=["attributes.start_time ASC"],
        max_results=MAX_RESULTS,
    ):
        probed = run.data.tags.get(PARENT_TAG) or run.data.tags.get(PROBED_RUN_TAG)
        if probed in trial_ids and run.info.status == "FINISHED":
            probes[probed] = run  # ascending start time: the latest wins
    return probes


def _varying_params(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    skip = {"train.seed", REPRESENTATIVES_PARAM}
    return [k for k in keys if k not in skip and len({r.data.params.get(k) for r in runs}) > 1]


def study_from_mlflow(
    tracking_uri: str, experiment_name: str, parent_run_id: str | None = None
) -> tuple[Any, list[str], str, str, list[dict[str, Any]]]:
    """(parent run, searched keys, metric, mode, trial rows) of a logged study; the latest
    study run of the experiment unless `parent_run_id` is given. A row has the keys `trial`,
    each searched key, `train.seed`, `representatives`, `epochs`, `final` and `best` (of the
    study metric), `seconds`, `status`, `stopped_early`, `run_id` and `history` (the study
    metric per epoch, {epoch: value}), as the driver's summary rows: `cbtlab.tune.budget`'s
    `common_budget` and `with_budget_values` give them their `at_budget`, by which
    `cbtlab.tables.format_table` ranks them."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {experiment_name!r} at {tracking_uri}")
    if parent_run_id is None:
        parents = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise LookupError(f"experiment {experiment_name!r} holds no study run")
        parent = parents[0]
    else:
        parent = client.get_run(parent_run_id)
    keys = list(json.loads(parent.data.params[SPACE_PARAM]))
    metric, _, mode = parent.data.params[METRIC_PARAM].rpartition(":")
    children = child_runs(client, experiment.experiment_id, parent.info.run_id, max_results=10_000)
    rows = []
    for run in children:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            {
                "trial": run.info.run_name,
                **{key: params.get(key) for key in keys},
                "train.seed": params.get("train.seed", tags.get(SEED_TAG)),
                "representatives": params.get(REPRESENTATIVES_PARAM),
                "epochs": tags.get(EPOCHS_TAG, "-"),
                "final": metrics.get(metric),
                "best": metrics.get(f"{BEST_PREFIX}{metric}"),
                "seconds": metrics.get(TIME_KEY),
                "status": run.info.status,
                "stopped_early": tags.get(STOPPED_EARLY_TAG) == "true",
                "run_id": run.info.run_id,
                "history": dict(metric_history(client, run.info.run_id, metric)),
            }
        )
    return parent, keys, metric, mode, rows


# The early-stopping check (cbtlab.tune.early_stopping): a run of its own (role ROLE_CHECK) in
# the experiment of the grid and the search it runs, whose parent runs carry CHECK_RUN_TAG.
ROLE_CHECK = "check"
CHECK_RUN_TAG = f"{TAG_PREFIX}check_run"  # a study's parent run: the check it ran for
CHECK_STUDY_PARAM = "check.study"  # the space checked: "rep-count" | "variants"
CHECK_GRID_RUN_PARAM = "check.grid_run"  # the grid's parent run id
CHECK_SEARCH_RUN_PARAM = "check.search_run"  # the search's parent run id
CHECK_TARGET_PARAM = "check.target_fraction"  # the epochs fraction the claim allows
CHECK_AGREE_METRIC = "check/agree"  # 1: ASHA's pick is among the grid's indistinguishable cells
CHECK_EPOCHS_METRIC = "check/epochs_fraction"  # the search's trained epochs / the grid's
CHECK_SECONDS_METRIC = "check/seconds_fraction"  # the search's trial seconds / the grid's
CHECK_TEXT = "check.txt"
CHECK_JSON = "check.json"
