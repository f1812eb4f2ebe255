"""Run a study: a Ray Tune search whose trials each drive a Ray Train `TorchTrainer`.

Three layers, as in Ray's Train V2 + Tune pattern:
  Tuner (this process: the searcher, ASHA, the MLflow writer)
    -> trial driver (`_run_trial`: builds and fits a TorchTrainer)
      -> training workers (`cbtlab.train.train_loop_per_worker`, DDP)

Two kinds of study:
- a search (the default): Optuna's seeded TPE proposes cells of `space`, ASHA may stop them;
- a grid (`grid=True`, implied by `seeds > 1` or explicit `cells`): every cell runs once per
  seed, `train.seed = base seed + i` for i < seeds, the same seeds in every cell so that cells
  pair up seed by seed; trials are queued seed-major (every cell with the first seed, then the
  second, ...) so that an interrupted study still holds complete pairs. ASHA is off in a grid:
  every trial runs all its epochs, so every cell's seeds are treated alike and the statistics
  compare values at the same epoch. Afterwards the driver compares every cell with the baseline
  (`cbtlab.tune.stats`), writes `stats.parquet` and logs it on the study's parent run.

Resuming (`resume_study`): a study keeps what its driver needs to go on in
`<storage_path>/<study>-<parent run id[:8]>/cbtlab_study.json` (the spec, the trials' base
config, the parent run, the MLflow store), beside Tune's own experiment state and, for a search,
the Optuna study (`optuna.db` there unless `optuna_storage` names an RDB URL). A driver killed
mid-study is resumed with `Tuner.restore(..., resume_errored=True)`: finished trials are kept,
unfinished and errored ones run again, and each Train run restarts from its latest checkpoint
(Ray Train V2 restores a run that has the same name and storage path). The MLflow callback
re-attaches to the parent and to each trial's child run (see `MLflowTrialLogger`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtlab.cluster import (
    NODE_SIZED_KEYS,
    connect_ray,
    node_resources,
    resolve_use_gpu,
    size_from_node,
)
from cbtlab.config import ConfigError, DataConfig, ExperimentConfig
from cbtlab.paths import default_tracking_uri, ray_results_home
from cbtlab.tables import format_table
from cbtlab.tune.stats import (
    TESTS,
    Observation,
    cell_label,
    compare_cells,
    format_stats,
    write_stats,
)

log = logging.getLogger(__name__)

# MLflow's limit on a param value's length.
MLFLOW_PARAM_CHARS = 6000
# CPUs held by a trial's driver process by default (its TorchTrainer's workers hold their own).
TRIAL_DRIVER_CPUS = 0.1
# What a resumed driver needs, beside the Tune results of the study (see resume_study).
STATE_FILE = "cbtlab_study.json"
STATE_VERSION = 1
# The Optuna study's default storage, a SQLite file in the study's results folder.
OPTUNA_FILE = "optuna.db"


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
    # ASHA early stopping; a search only (a grid runs every trial to the end).
    asha: bool = True
    # Epochs every trial runs before ASHA may stop it; None means half of train.epochs.
    grace_period: int | None = None
    reduction_factor: int = 2
    # An explicit grid instead of the Optuna search: every cell runs once per seed.
    grid: bool = False
    # The grid's cells (each a full assignment of `space`); empty: the full factorial of `space`
    # (validate() fills it in, spelled as the flat config).
    cells: list[dict[str, Any]] = field(default_factory=list)
    # Seeds per cell: train.seed = base.train.seed + i for i < seeds, in every cell alike.
    seeds: int = 1
    # The cell every other cell is compared with; None: the grid's first cell.
    baseline: dict[str, Any] | None = None
    # The statistics' paired test ("auto", "t", "wilcoxon", see cbtlab.tune.stats) and the trial
    # value they use: the metric at the last epoch ("final") or its best over the epochs ("best").
    stats_test: str = "auto"
    stats_on: str = "final"
    # Training workers per trial and GPUs per worker (0 or 1, setting train.use_gpu); None:
    # train.num_workers and train.use_gpu, whose "auto" is a GPU per worker where the cluster has
    # one (see plan_resources).
    workers: int | None = None
    gpus_per_worker: int | None = None
    # Config keys sized from the GPU node when the trials get GPUs (cbtlab.cluster.size_from_node:
    # train.cpus_per_worker, data.loader_workers); the imagenet preset's, unless --set.
    node_sized: list[str] = field(default_factory=list)
    # Trials at once; None: 1 for a search (ASHA's and TPE's decisions then do not depend on
    # timing), as many as the cluster's resources fit for a grid.
    max_concurrent: int | None = None
    # CPUs held by each trial's driver process (the TorchTrainer's workers hold their own).
    trial_driver_cpus: float = TRIAL_DRIVER_CPUS
    # Where a search keeps its Optuna study: an RDB URL (sqlite:///..., postgresql://...);
    # empty: a SQLite file in the study's results folder (under CBTLAB_HOME for remote storage).
    optuna_storage: str = ""
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
            if not self.cells:  # explicit cells are checked whole below (values may pair up)
                for value in values:  # each value must give a valid config on its own
                    self.base.with_overrides({key: value})
        for point in self.initial_points:
            if set(point) != set(self.space):
                raise ConfigError(
                    "study.initial_points", f"{point} does not assign {set(self.space)}"
                )
            self.base.with_overrides(point)
        scaling: dict[str, Any] = {}
        if self.workers is not None:
            if self.workers < 1:
                raise ConfigError("study.workers", f"must be >= 1, got {self.workers}")
            scaling["train.num_workers"] = self.workers
        if self.gpus_per_worker is not None:
            if self.gpus_per_worker not in (0, 1):
                raise ConfigError(
                    "study.gpus_per_worker",
                    f"one GPU per worker (DDP) or none, got {self.gpus_per_worker}",
                )
            scaling["train.use_gpu"] = bool(self.gpus_per_worker)
        unknown = [key for key in self.node_sized if key not in NODE_SIZED_KEYS]
        if unknown:
            raise ConfigError(
                "study.node_sized", f"{unknown[0]!r} is not one of {', '.join(NODE_SIZED_KEYS)}"
            )
        if scaling:
            self.base = self.base.with_overrides(scaling)
        if self.seeds < 1:
            raise ConfigError("study.seeds", f"must be >= 1, got {self.seeds}")
        self.grid = self.grid or self.seeds > 1 or bool(self.cells)
        if self.grid and "train.seed" in self.space:
            raise ConfigError("train.seed", "a grid sets the seeds itself: use study.seeds")
        for cell in self.cells:
            if set(cell) != set(self.space):
                raise ConfigError("study.cells", f"{cell} does not assign {set(self.space)}")
        if self.grid:  # every cell, spelled as the flat config, must give a valid config
            self.cells = grid_cells(self)
        if self.baseline is not None:
            self.baseline = normalise_cell(self.base, self.baseline)
            if self.grid and self.baseline not in self.cells:
                raise ConfigError(
                    "study.baseline",
                    f"{cell_label(self.baseline)} is not a cell of the grid; cells: "
                    + "; ".join(cell_label(c) for c in self.cells),
                )
        if self.stats_test not in TESTS:
            raise ConfigError(
                "study.stats_test", f"{self.stats_test!r} is not one of {', '.join(TESTS)}"
            )
        if self.stats_on not in ("final", "best"):
            raise ConfigError("study.stats_on", f"{self.stats_on!r} is not 'final' or 'best'")
        if self.num_samples < 1:
            raise ConfigError("study.num_samples", f"must be >= 1, got {self.num_samples}")
        if self.mode not in ("max", "min"):
            raise ConfigError("study.mode", f"{self.mode!r} is not one of 'max', 'min'")
        if self.max_concurrent is not None and self.max_concurrent < 1:
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
        if "://" not in self.storage_path:  # Tune and the resume state want absolute paths
            self.storage_path = str(Path(self.storage_path).expanduser().resolve())
        self.tracking_uri = self.tracking_uri or default_tracking_uri()
        self.experiment_name = self.experiment_name or self.name
        return self

    @property
    def seed_values(self) -> list[int]:
        """The seeds every cell of a grid runs with."""
        return [self.base.train.seed + i for i in range(self.seeds)]

    @property
    def trial_keys(self) -> list[str]:
        """The config keys that tell one trial from another (the summary table's columns)."""
        return [*self.space, "train.seed"] if self.grid else list(self.space)


def normalise_cell(base: ExperimentConfig, cell: Mapping[str, Any]) -> dict[str, Any]:
    """`cell` with its values as the flat config writes them (grids as 'HxW', numbers typed),
    so that cells given in any spelling compare equal to the trials' configs."""
    flat = base.with_overrides(dict(cell)).flat()
    return {key: flat[key] for key in cell}


def grid_cells(spec: StudySpec) -> list[dict[str, Any]]:
    """The cells of a grid study, normalised: `spec.cells`, or the full factorial of
    `spec.space` (the last key varying fastest)."""
    if spec.cells:
        cells = spec.cells
    else:
        combos = itertools.product(*spec.space.values())
        cells = [dict(zip(spec.space, combo, strict=True)) for combo in combos]
    return [normalise_cell(spec.base, cell) for cell in cells]


def grid_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """Every trial of a validated grid study, in the order they are queued: each cell with the
    first seed, then each cell with the second, ... (`train.seed` = base seed + i in every
    cell)."""
    cells = spec.cells
    return [{**cell, "train.seed": seed} for seed in spec.seed_values for cell in cells]


@dataclass
class ResourcePlan:
    """How a study's trials fit on the cluster."""

    base: ExperimentConfig  # the study's base config with the trial scaling applied
    max_concurrent: int
    trial_cpus: float
    trial_gpus: int
    fits: int  # trials the whole cluster holds at once
    summary: str


def plan_resources(
    spec: StudySpec,
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> ResourcePlan:
    """Size the trials for `cluster` (as `ray.cluster_resources()` reports it) and its `nodes`
    (each node's resources, as `ray.nodes()` lists them; None: the cluster is one node).

    A GPU per worker as train.use_gpu says (set by `spec.gpus_per_worker`), its "auto" resolved
    by `cbtlab.cluster.resolve_use_gpu`: where the cluster has a GPU. On GPUs, the keys of
    `spec.node_sized` are sized for the GPU node (`cbtlab.cluster.size_from_node`).
    `max_concurrent` (unless given): 1 for a search, for a grid as many trials as the cluster's
    CPUs and GPUs hold (at least 1; more wait for resources)."""
    base = resolve_use_gpu(spec.base, cluster)
    base, sized = size_from_node(
        base,
        [cluster] if nodes is None else nodes,
        spec.node_sized,
        driver_cpus=spec.trial_driver_cpus,
    )
    train = base.train
    trial_cpus = spec.trial_driver_cpus + train.num_workers * train.cpus_per_worker
    trial_gpus = train.num_workers if train.use_gpu else 0
    fits = trials_that_fit(cluster, trial_cpus, trial_gpus)
    if spec.max_concurrent is not None:
        concurrent = spec.max_concurrent
    else:
        concurrent = max(1, fits) if spec.grid else 1
    worker = f"{train.cpus_per_worker:g} CPU" + (", 1 GPU" if train.use_gpu else "")
    summary = (
        f"each trial: {train.num_workers} workers x ({worker}) + {spec.trial_driver_cpus:g} CPU "
        f"for its driver; the cluster ({cluster.get('CPU', 0):g} CPU, "
        f"{cluster.get('GPU', 0):g} GPU) holds {fits} at once; running {concurrent} at once"
    )
    if sized:
        summary += f"; {sized}"
    if fits < 1:
        summary += " (a trial needs more than the cluster has now: it waits for resources)"
    return ResourcePlan(base, concurrent, trial_cpus, trial_gpus, fits, summary)


def trials_that_fit(cluster: Mapping[str, float], trial_cpus: float, trial_gpus: int) -> int:
    """How many trials of `trial_cpus` CPUs and `trial_gpus` GPUs `cluster` holds at once."""
    fits = math.floor(cluster.get("CPU", 0.0) / trial_cpus + 1e-9)
    if trial_gpus:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / trial_gpus + 1e-9))
    return fits


@dataclass
class StudyResult:
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    rows: list[dict[str, Any]]
    failed: int
    mode: str = "max"
    # The printed trial table; for a grid also its statistics (a pyarrow Table), their text
    # and where stats.parquet was written (also an artifact of the parent run).
    table: str = ""
    stats: Any = None
    stats_text: str = ""
    stats_path: str = ""

    @property
    def best(self) -> dict[str, Any] | None:
        done = [r for r in self.rows if r["best"] is not None]
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda r: r["best"]) if done else None


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], storage_path: str) -> None:
    """A Tune trial: build the trial's config and fit a TorchTrainer on it."""
    from ray import tune

    from cbtlab.train import build_trainer, fit
    from cbtlab.tune.callbacks import EpochReportCallback

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
    from cbtlab.data import open_split, prepare_dataset

    return open_split(prepare_dataset(data), "train").content_hash


def run_tags(study: str, data_hash: str) -> dict[str, str]:
    """The tags of every run a study writes: its name, the data hash, code and packages."""
    from cbtlab.tracking import provenance_tags

    tags = {
        "mlflow.source.name": sys.argv[0] or "cbtlab",
        "mlflow.source.type": "LOCAL",
        "cbtlab.study": study,
        "cbtlab.data_hash": data_hash,
        **provenance_tags(),
    }
    if tags["cbtlab.git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["cbtlab.git_commit"]
    return tags


@dataclass
class StudyState:
    """What a resumed driver needs; `STATE_FILE` in the study's results folder."""

    run_name: str  # Tune's experiment name: <study>-<parent run id[:8]>
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    storage_path: str
    spec: dict[str, Any]  # spec_to_dict of the validated spec
    trial_base: dict[str, Any]  # the trials' base config (plan_resources applied)
    optuna_storage: str = ""  # the Optuna study's storage, password hidden ("" for a grid)
    version: int = STATE_VERSION

    @property
    def path(self) -> str:
        return study_path(self.storage_path, self.run_name)


def study_path(storage_path: str, run_name: str) -> str:
    """A study's results folder: Tune's experiment folder `<storage_path>/<run_name>`."""
    return f"{storage_path.rstrip('/')}/{run_name}"


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """A StudySpec as plain JSON values (the base config as `ExperimentConfig.to_dict`)."""
    data = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    data["base"] = spec.base.to_dict()
    data["optuna_storage"] = redact_url(spec.optuna_storage)
    return json.loads(json.dumps(data, default=list))


def spec_from_dict(data: Mapping[str, Any]) -> StudySpec:
    """The StudySpec of `spec_to_dict` (keys it does not know are skipped)."""
    known = {f.name for f in dataclasses.fields(StudySpec)}
    values = {key: value for key, value in data.items() if key in known}
    values["base"] = ExperimentConfig.from_dict(values["base"])
    return StudySpec(**values)


def redact_url(url: str) -> str:
    """A database URL with its password hidden (as it may be logged or written to disk)."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def write_study_state(state: StudyState) -> str:
    """Write `state` to its study's results folder (local or a URI); return the file's path."""
    path = f"{state.path}/{STATE_FILE}"
    fs, inner = _filesystem(path)
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(json.dumps(dataclasses.asdict(state), indent=2).encode())
    return path


def read_study_state(path: str) -> StudyState:
    """The state of the study whose results folder (or state file) is `path`."""
    text = path.rstrip("/")
    if not text.endswith(STATE_FILE):
        text = f"{text}/{STATE_FILE}"
    fs, inner = _filesystem(text)
    try:
        with fs.open_input_stream(inner) as handle:
            data = json.loads(handle.read().decode())
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"no study to resume at {path}: expected {STATE_FILE}, which a study writes in its "
            f"results folder <storage path>/<study>-<run id>/ ({exc})"
        ) from exc
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{text}: state version {data.get('version')}, expected {STATE_VERSION}")
    known = {f.name for f in dataclasses.fields(StudyState)}
    return StudyState(**{key: value for key, value in data.items() if key in known})


def latest_study_path(storage_path: str, name: str) -> str:
    """The results folder of the study `name` started last under a local `storage_path`."""
    found = sorted(
        Path(storage_path).expanduser().glob(f"{name}-*/{STATE_FILE}"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise FileNotFoundError(
            f"no study {name!r} to resume under {storage_path} (no {name}-*/{STATE_FILE})"
        )
    return str(found[-1].parent)


def optuna_storage_url(spec: StudySpec, run_name: str) -> str:
    """`spec.optuna_storage`, else a SQLite file in the study's results folder (under
    CBTLAB_HOME when the Ray storage is remote: SQLite needs a local file)."""
    if spec.optuna_storage:
        return spec.optuna_storage
    if "://" in spec.storage_path:
        from cbtlab.paths import cbtlab_home

        folder = cbtlab_home() / "optuna" / run_name
    else:
        folder = Path(spec.storage_path) / run_name
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / OPTUNA_FILE}"


def run_study(spec: StudySpec) -> StudyResult:
    """Run the study to completion; log it to MLflow; return its summary rows."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from cbtlab.tracking import StudyTracker
    from cbtlab.tune.callbacks import MLflowTrialLogger

    spec.validate()
    tracker = StudyTracker(spec.tracking_uri, spec.experiment_name)
    tags = run_tags(spec.name, dataset_hash(spec.base.data))
    connect_ray(spec.ray_address, worker_logs=spec.worker_logs)
    plan = plan_resources(spec, ray.cluster_resources(), node_resources())
    base = plan.base
    _say(f"study {spec.name}: {plan.summary}")
    trials = grid_trials(spec) if spec.grid else []
    if spec.grid:
        _say(
            f"study {spec.name}: a grid of {len(spec.cells)} cells x {spec.seeds} "
            f"seeds {spec.seed_values} = {len(trials)} trials; no early stopping (ASHA is off "
            "in a grid so that every cell's seeds run the same epochs)"
        )
    parent_params = {
        **base.flat(),
        "study.space": json.dumps(spec.space),
        "study.num_samples": len(trials) if spec.grid else spec.num_samples,
        "study.search_seed": spec.search_seed,
        "study.searcher": "grid" if spec.grid else "optuna-tpe",
        "study.scheduler": (
            f"asha(grace={spec.grace_period},rf={spec.reduction_factor})"
            if spec.asha and not spec.grid
            else "fifo"
        ),
        "study.metric": f"{spec.metric}:{spec.mode}",
        "study.seeds": spec.seeds,
        "study.max_concurrent": plan.max_concurrent,
    }
    if spec.grid:
        cells_json = json.dumps(spec.cells)
        if len(cells_json) <= MLFLOW_PARAM_CHARS:  # else only in the artifact cells.json
            parent_params["study.cells"] = cells_json
        parent_params["study.baseline"] = cell_label(spec.baseline or spec.cells[0])
        parent_params["study.stats"] = f"{spec.stats_test}:{spec.stats_on}"
    parent_run_id = tracker.start_run(
        spec.name,
        params=parent_params,
        tags={**tags, "cbtlab.role": "study", "cbtlab.config_hash": base.config_hash()},
    )
    run_name = f"{spec.name}-{parent_run_id[:8]}"
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=parent_run_id,
        base=base,
        tags={**tags, "cbtlab.role": "trial"},
        metric=spec.metric,
        cell_keys=list(spec.space),
    )
    if spec.grid:
        tracker.log_text(parent_run_id, cells_json, "cells.json")

    def fit() -> None:
        storage_url = ""
        if spec.grid:
            # The explicit list, in order: each point replaces one of num_samples random
            # samples of the (never sampled) choices below. Tune ignores max_concurrent_trials
            # with this searcher: it takes its own limit.
            searcher = BasicVariantGenerator(
                points_to_evaluate=trials, max_concurrent=plan.max_concurrent
            )
            num_samples = len(trials)
            param_space = {
                **{key: tune.choice(values) for key, values in spec.space.items()},
                "train.seed": tune.choice(spec.seed_values),
            }
        else:
            # A study of its own per run (named as Tune's experiment), kept in a database so
            # that the search state outlives the driver.
            storage_url = optuna_storage_url(spec, run_name)
            searcher = OptunaSearch(
                metric=spec.metric,
                mode=spec.mode,
                points_to_evaluate=spec.initial_points or None,
                sampler=optuna.samplers.TPESampler(seed=spec.search_seed),
                study_name=run_name,
                storage=optuna.storages.RDBStorage(storage_url),
            )
            tracker.log_params(
                parent_run_id,
                {"study.optuna_storage": redact_url(storage_url), "study.optuna_study": run_name},
            )
            num_samples = spec.num_samples
            param_space = {key: tune.choice(values) for key, values in spec.space.items()}
        state = StudyState(
            run_name,
            parent_run_id,
            spec.tracking_uri,
            spec.experiment_name,
            spec.storage_path,
            spec_to_dict(spec),
            base.to_dict(),
            redact_url(storage_url),
        )
        write_study_state(state)
        tracker.set_tags(parent_run_id, {"cbtlab.study_path": state.path})
        _say(f"study {spec.name}: if its driver stops, go on with --resume {state.path}")
        scheduler = None
        if spec.asha and not spec.grid:
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=base.train.epochs,
                grace_period=min(spec.grace_period, base.train.epochs),
                reduction_factor=spec.reduction_factor,
            )
        tuner = tune.Tuner(
            trial_trainable(base, spec.storage_path, spec.trial_driver_cpus),
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
                callbacks=[logger],
                verbose=0,
            ),
        )
        tuner.fit()

    return _drive(fit, spec, tracker, logger, parent_run_id, run_name, reload=False)


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

    from cbtlab.tracking import StudyTracker, provenance_differences
    from cbtlab.tune.callbacks import MLflowTrialLogger

    state = read_study_state(path)
    folder = path.rstrip("/").removesuffix(STATE_FILE).rstrip("/")
    if "://" not in folder:
        folder = str(Path(folder).expanduser().resolve())
    spec = spec_from_dict(state.spec)
    spec.ray_address, spec.worker_logs = ray_address, worker_logs
    # Tune resumes from where the folder is now; the trials' Train runs are its neighbours.
    spec.storage_path = folder.rpartition("/")[0]
    spec.validate()
    base = ExperimentConfig.from_dict(state.trial_base)
    tracker = StudyTracker(state.tracking_uri, state.experiment_name)
    parent = tracker.client.get_run(state.parent_run_id)
    tags = run_tags(spec.name, dataset_hash(base.data))
    for problem in provenance_differences(parent.data.tags, tags):
        _say(f"warning: this driver differs from the one that started the study: {problem}")
    connect_ray(spec.ray_address, worker_logs=spec.worker_logs)
    resumed = int(parent.data.tags.get("cbtlab.resumed", "0")) + 1
    tracker.reopen(state.parent_run_id)
    tracker.set_tags(state.parent_run_id, {"cbtlab.resumed": str(resumed)})
    _say(f"study {spec.name}: resuming {folder} (parent run {state.parent_run_id})")
    # Tune restores the callback pickled when the study started, which writes the runs; this
    # one reads them back for the summary (reload=True).
    logger = MLflowTrialLogger(
        tracker,
        parent_run_id=state.parent_run_id,
        base=base,
        tags={**tags, "cbtlab.role": "trial"},
        metric=spec.metric,
        cell_keys=list(spec.space),
    )

    def fit() -> None:
        trainable = trial_trainable(base, spec.storage_path, spec.trial_driver_cpus)
        tune.Tuner.restore(folder, trainable=trainable, resume_errored=True).fit()

    return _drive(fit, spec, tracker, logger, state.parent_run_id, state.run_name, reload=True)


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
        table = format_table(rows, spec.trial_keys, spec.metric, spec.mode)
        result = StudyResult(
            parent_run_id, spec.tracking_uri, spec.experiment_name, rows, failed, spec.mode, table
        )
        tracker.log_text(parent_run_id, table, "summary.txt")
        tracker.log_text(parent_run_id, json.dumps(rows, indent=2), "summary.json")
        if spec.grid and rows:
            _log_statistics(result, spec, tracker, run_name)
        if result.best is not None:
            tracker.log_metrics(parent_run_id, {f"best/{spec.metric}": result.best["best"]}, step=0)
        tracker.set_tags(
            parent_run_id, {"cbtlab.trials": str(len(rows)), "cbtlab.failed": str(failed)}
        )
        tracker.end_run(parent_run_id, status)
    return result


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def study_statistics(rows: list[dict[str, Any]], spec: StudySpec) -> Any:
    """The statistics table (`cbtlab.tune.stats.compare_cells`) of a grid study's trial rows:
    a cell's value per seed is its `spec.stats_on` metric; failed trials and trials stopped
    before their last epoch count as missing. Cells follow the grid's order."""
    factors = list(spec.space)
    cells = spec.cells
    order = {tuple(c.values()): i for i, c in enumerate(cells)}

    def value(row: dict[str, Any]) -> float | None:
        complete = row["status"] == "FINISHED" and not row["stopped_early"]
        return row[spec.stats_on] if complete else None

    observations = sorted(
        (Observation({k: r[k] for k in factors}, r["train.seed"], value(r)) for r in rows),
        key=lambda o: (order.get(tuple(o.cell.values()), len(order)), o.seed),
    )
    present = {tuple(o.cell.values()) for o in observations}
    baseline = spec.baseline or cells[0]
    if tuple(baseline.values()) not in present:
        raise LookupError(f"the baseline {cell_label(baseline)} ran no trial")
    return compare_cells(
        observations,
        baseline=baseline,
        test=spec.stats_test,
        metric=f"{spec.stats_on} {spec.metric}",
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
            }
        )
    return rows


def mlflow_ui_command(tracking_uri: str) -> str:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    program = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (the tracking server's UI)"
    return f"{program} ui --backend-store-uri {tracking_uri}"
