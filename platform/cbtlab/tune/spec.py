"""A study's specification: `StudySpec`, its validation, a grid's cells and trials, and its
plain-JSON form (the state a resumed driver reads back).

`StudySpec.validate()` raises `ConfigError` naming the first bad field and fills in what the
spec leaves open (a grid's cells, the grace period, the storage and tracking locations); a
grid's trials are queued seed-major (`grid_trials`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtlab.cluster import NODE_SIZED_KEYS
from cbtlab.config import ConfigError, ExperimentConfig, format_grid, parse_grid
from cbtlab.paths import default_tracking_uri, ray_results_home, redact_url
from cbtlab.tune.stats import TESTS, cell_label
from cbtlab.tune.stores import check_shared_stores

# MLflow's limit on a param value's length.
MLFLOW_PARAM_CHARS = 6000
# CPUs held by a trial's driver process by default (its TorchTrainer's workers hold their own).
TRIAL_DRIVER_CPUS = 0.1


@dataclass
class StudySpec:
    """Everything a study run needs; studies/ scripts fill it from their flags."""

    name: str
    base: ExperimentConfig
    # Dotted config key -> the values to search (categorical).
    space: dict[str, list[Any]]
    # Trials to run first, in order (each a full assignment of `space`; with `conditional`, any
    # keys of one branch, the sampler picking the rest), before the sampler.
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
    # one (see cbtlab.tune.resources.plan_resources).
    workers: int | None = None
    gpus_per_worker: int | None = None
    # Config keys sized from the GPU node when the trials get GPUs (cbtlab.cluster.size_from_node:
    # train.cpus_per_worker, data.loader_workers); the imagenet preset's, unless --set.
    node_sized: list[str] = field(default_factory=list)
    # Trials at once; None: as many as the cluster's resources fit (asynchronous ASHA stops a
    # search's trials as their results come). 1 makes a search's decisions (TPE's, ASHA's)
    # independent of timing, so that a resumed search repeats an uninterrupted one.
    max_concurrent: int | None = None
    # CPUs held by each trial's driver process (the TorchTrainer's workers hold their own).
    trial_driver_cpus: float = TRIAL_DRIVER_CPUS
    # Where a search keeps its Optuna study: an RDB URL (sqlite:///..., postgresql://...);
    # empty: a SQLite file in the study's results folder. A remote storage_path needs a shared
    # database here (cbtlab.tune.stores.check_shared_stores).
    optuna_storage: str = ""
    ray_address: str | None = None
    # Stream the training workers' own logs to this console (Tune's error files keep them anyway).
    worker_logs: bool = False
    storage_path: str = ""
    tracking_uri: str = ""
    experiment_name: str = ""
    # A conditional search space (an Optuna define-by-run search, `ConditionalSpace`): rules,
    # in order, each {"when": {key: [values]}, "sample": {key: [values]}, "set": {key: value}};
    # a rule whose `when` holds on the keys assigned so far samples its keys and sets its
    # constants. The space's other keys are sampled first, in every trial. validate() adds the
    # rules' keys to `space` (the table's columns; a trial that does not sample one keeps the
    # base value). Empty: every key of `space` is sampled in every trial.
    conditional: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> StudySpec:
        """Check every field (a ConfigError names the first bad one) and fill in the defaults:
        the trial scaling on the base config, a grid's cells, the grace period, the storage
        path (absolute), the tracking URI and the experiment name."""
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError("study.name", f"must be a non-empty word, got {self.name!r}")
        self.base.validate()
        self._check_conditional()
        self._check_space()
        self._apply_scaling()
        self._check_grid()
        self._check_statistics()
        self._check_search()
        self.storage_path = self.storage_path or str(ray_results_home())
        if "://" not in self.storage_path:  # Tune and the resume state want absolute paths
            self.storage_path = str(Path(self.storage_path).expanduser().resolve())
        self.tracking_uri = self.tracking_uri or default_tracking_uri()
        self.experiment_name = self.experiment_name or self.name
        check_shared_stores(
            self.storage_path, self.tracking_uri, self.optuna_storage, search=not self.grid
        )
        return self

    def _check_space(self) -> None:
        """The space's keys are config fields and each value gives a valid config; so do the
        initial points."""
        if not self.space:
            raise ConfigError("study.space", "the search space is empty")
        known = set(self.base.flat())
        for key, values in self.space.items():
            if key not in known:
                raise ConfigError(key, f"not a config field; fields: {', '.join(sorted(known))}")
            if not values:
                raise ConfigError(key, "no values to search")
            # explicit cells are checked whole below (values may pair up), a conditional
            # space's keys with their branches (_check_conditional)
            if not self.cells and key not in conditional_keys(self.conditional):
                for value in values:  # each value must give a valid config on its own
                    self.base.with_overrides({key: value})
        for point in self.initial_points:
            if self.conditional:  # partial points, checked by _check_conditional
                continue
            if set(point) != set(self.space):
                raise ConfigError(
                    "study.initial_points", f"{point} does not assign {set(self.space)}"
                )
            self.base.with_overrides(point)

    def _apply_scaling(self) -> None:
        """Set `workers` and `gpus_per_worker` on the base config; check `node_sized`."""
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

    def _check_grid(self) -> None:
        """Decide whether this is a grid; normalise its cells and its baseline."""
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

    def _check_statistics(self) -> None:
        if self.stats_test not in TESTS:
            raise ConfigError(
                "study.stats_test", f"{self.stats_test!r} is not one of {', '.join(TESTS)}"
            )
        if self.stats_on not in ("final", "best"):
            raise ConfigError("study.stats_on", f"{self.stats_on!r} is not 'final' or 'best'")

    def _check_search(self) -> None:
        """The search's size, direction, concurrency and ASHA settings (the grace period
        defaulting to half the epochs)."""
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

    def _check_conditional(self) -> None:
        """A conditional space: rules on config fields (`normalise_rules`), searched by Optuna
        (no grid), each trial it can give a valid config; its keys join `space`; initial
        points may be partial (`_conditional_point`)."""
        if not self.conditional:
            return
        if self.grid or self.seeds > 1 or self.cells:
            raise ConfigError(
                "study.conditional", "a conditional space is searched by Optuna, not run as a grid"
            )
        self.conditional = normalise_rules(self.base, self.space, self.conditional)
        self.space.update(conditional_keys(self.conditional))
        self.initial_points = [self._conditional_point(point) for point in self.initial_points]
        for assigned, _ in conditional_trials(self.space, self.conditional):
            try:
                self.base.with_overrides(assigned)
            except ConfigError as exc:
                raise ConfigError(
                    "study.conditional", f"the trial {cell_label(assigned)} is not valid: {exc}"
                ) from None

    def _conditional_point(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """An initial point of a conditional space, spelled as the flat config: any of the keys
        its branch samples (Optuna's enqueued trial; the sampler picks the others)."""
        flat = self.base.flat()
        unknown = [key for key in point if key not in flat]
        if unknown:
            raise ConfigError("study.initial_points", f"{unknown[0]!r} is not a config field")
        point = {key: _rule_value(flat, key, value) for key, value in point.items()}
        _, sampled = assign_conditional(
            self.space, self.conditional, lambda key, values: point.get(key, values[0])
        )
        wrong = [k for k, v in point.items() if k not in sampled or v not in self.space[k]]
        if wrong:
            raise ConfigError(
                "study.initial_points",
                f"{cell_label(point)}: {wrong[0]} is not sampled there with that value",
            )
        return point

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


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """A StudySpec as plain JSON values (the base config as `ExperimentConfig.to_dict`)."""
    data = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    data["base"] = spec.base.to_dict()
    data["optuna_storage"] = redact_url(spec.optuna_storage)
    data["tracking_uri"] = redact_url(spec.tracking_uri)
    return json.loads(json.dumps(data, default=list))


def spec_from_dict(data: Mapping[str, Any]) -> StudySpec:
    """The StudySpec of `spec_to_dict` (keys it does not know are skipped)."""
    known = {f.name for f in dataclasses.fields(StudySpec)}
    values = {key: value for key, value in data.items() if key in known}
    values["base"] = ExperimentConfig.from_dict(values["base"])
    return StudySpec(**values)


# A conditional space's rules: their parts, and how many trials validate() checks at most.
RULE_PARTS = ("when", "sample", "set")
MAX_CONDITIONAL_TRIALS = 100_000


def conditional_keys(rules: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The keys a conditional space's rules sample or set, each with its values (a set key's:
    the constants it is set to), in the rules' order."""
    keys: dict[str, list[Any]] = {}
    for rule in rules:
        if not isinstance(rule, Mapping):  # normalise_rules names it
            continue
        for key, values in (rule.get("sample") or {}).items():
            keys[key] = list(values)
        for key, value in (rule.get("set") or {}).items():
            keys.setdefault(key, [])
            if value not in keys[key]:
                keys[key].append(value)
    return keys


def _rule_value(base_flat: Mapping[str, Any], key: str, value: Any) -> Any:
    """A rule's value as the flat config spells it (grids 'HxW', a float field's int as float);
    Optuna's categorical choices must be None, bool, int, float or str."""
    if key.endswith("_grid"):
        return format_grid(parse_grid(value, key))
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(key, f"a searched value is None, bool, int, float or str, got {value!r}")
    if isinstance(base_flat[key], float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def normalise_rules(
    base: ExperimentConfig, space: Mapping[str, list[Any]], rules: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A conditional space's rules checked and spelled as the flat config: each part's keys are
    config fields, a key is sampled in one place only (the space's own keys or one rule) and
    never both sampled and set, a `when` names keys assigned before it (by the space's own keys
    or an earlier rule). Raises ConfigError naming the first bad rule."""
    flat = base.flat()
    conditional = set(conditional_keys(rules))
    assigned = {key for key in space if key not in conditional}
    sampled = set(assigned)
    fixed_keys: set[str] = set()
    normalised = []
    for i, rule in enumerate(rules):
        where = f"study.conditional[{i}]"
        if not isinstance(rule, Mapping) or not set(rule) <= set(RULE_PARTS):
            raise ConfigError(where, f"a rule is a mapping of {', '.join(RULE_PARTS)}: {rule!r}")
        parts = {part: dict(rule.get(part) or {}) for part in RULE_PARTS}
        for key in (k for part in parts.values() for k in part):
            if key not in flat:
                raise ConfigError(where, f"{key!r} is not a config field")
        if not parts["sample"] and not parts["set"]:
            raise ConfigError(where, "samples and sets nothing")
        when = {}
        for key, values in parts["when"].items():
            if key not in assigned:
                raise ConfigError(where, f"its condition on {key} comes before {key} is assigned")
            values = values if isinstance(values, list) else [values]
            when[key] = [_rule_value(flat, key, v) for v in values]
        sample = {}
        for key, values in parts["sample"].items():
            if key in sampled | fixed_keys or key in parts["set"]:
                raise ConfigError(where, f"{key} is sampled or set elsewhere: sample it once")
            if not isinstance(values, list) or not values:
                raise ConfigError(where, f"{key}: give a non-empty list of values")
            sample[key] = list(dict.fromkeys(_rule_value(flat, key, v) for v in values))
            sampled.add(key)
        fixed = {key: _rule_value(flat, key, v) for key, v in parts["set"].items()}
        if sampled & set(fixed):
            raise ConfigError(where, f"sets {sorted(sampled & set(fixed))}, which are sampled")
        assigned |= set(sample) | set(fixed)
        fixed_keys |= set(fixed)
        normalised.append({"when": when, "sample": sample, "set": fixed})
    return normalised


def assign_conditional(
    space: Mapping[str, list[Any]],
    rules: list[dict[str, Any]],
    choose: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Walk a conditional space: `choose(key, values)` picks each sampled key's value (the
    space's own keys first, then each rule whose `when` holds on what is assigned so far).
    Returns (every key assigned, the sampled ones)."""
    conditional = conditional_keys(rules)
    assigned: dict[str, Any] = {}
    sampled: dict[str, Any] = {}
    for key, values in space.items():
        if key not in conditional:
            assigned[key] = sampled[key] = choose(key, list(values))
    for rule in rules:
        if all(k in assigned and assigned[k] in v for k, v in rule["when"].items()):
            for key, values in rule["sample"].items():
                assigned[key] = sampled[key] = choose(key, list(values))
            assigned.update(rule["set"])
    return assigned, sampled


def conditional_trials(
    space: Mapping[str, list[Any]], rules: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every distinct trial of a conditional space, as `assign_conditional` gives it (each
    branch once, depth first)."""
    trials = []
    paths: list[list[int]] = [[]]
    while paths:
        path = paths.pop()
        sizes: list[int] = []

        def choose(key: str, values: list[Any], path: list[int] = path, sizes: list[int] = sizes):
            depth = len(sizes)
            sizes.append(len(values))
            return values[path[depth] if depth < len(path) else 0]

        trials.append(assign_conditional(space, rules, choose))
        if len(trials) > MAX_CONDITIONAL_TRIALS:
            raise ConfigError(
                "study.conditional", f"more than {MAX_CONDITIONAL_TRIALS} distinct trials"
            )
        full = path + [0] * (len(sizes) - len(path))
        for depth in range(len(path), len(sizes)):
            paths += [[*full[:depth], j] for j in range(1, sizes[depth])]
    return trials


def sampled_params(
    space: Mapping[str, list[Any]], rules: list[dict[str, Any]], row: Mapping[str, Any]
) -> dict[str, Any]:
    """The keys a trial of a conditional space sampled, with their values, from its summary
    row (every space key's config value): the walk replayed with the row's choices."""
    return assign_conditional(space, rules, lambda key, values: row[key])[1]


class ConditionalSpace:
    """The define-by-run function of a conditional space for Ray Tune's `OptunaSearch`: samples
    each key with `trial.suggest_categorical` where its rule holds and returns the rules'
    constants (Tune adds the sampled values). A plain class, so that it pickles with the
    searcher's state (a resumed study restores it)."""

    def __init__(self, space: Mapping[str, list[Any]], rules: list[dict[str, Any]]) -> None:
        self.space = {key: list(values) for key, values in space.items()}
        self.rules = rules

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        assigned, sampled = assign_conditional(self.space, self.rules, trial.suggest_categorical)
        return {key: v for key, v in assigned.items() if key not in sampled} or None
