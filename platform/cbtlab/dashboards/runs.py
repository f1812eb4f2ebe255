"""A study's trial runs as one table: one row per trial run, with its cell summaries and notes.

`trial_rows` turns a study read by `cbtlab.tracking.schema.load_study` into rows;
`trial_table` makes them a pyarrow Table (`TABLE_COLUMNS` first, then one column per searched
factor after `cell`, then `rc/layer_XX` columns when logged); `study_notes` lists what is
missing or partial.

The per-trial *value* (the column `value`) is what the report plots and averages over seeds:
the study metric at the study's *budget*, the largest epoch every finished trial reached
(`cbtlab.tune.budget.common_budget`; under ASHA its first rung), as the study driver ranks and
tests its trials: the metric there (`final`) or its best over the epochs up to it (`best`), per
the study's `study.stats` (`StudyRuns.value_kind`). The column `value_epoch` says which epoch,
the table's metadata `budget` too. Trials not compared (failed, killed, running, without an
epoch of the metric) have no value and the notes name them. A trial's own last and best values
(`final`, `best`, over however many epochs it ran) are shown beside, never averaged or ranked.

A search logged before searches logged `study.stats` (`equal_budget` False) keeps the old
value, each finished trial's best over its own epochs, and the notes say that those budgets may
differ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from cbtlab.analysis import count_flops
from cbtlab.models import build_model
from cbtlab.tracking.schema import (
    BEST_PREFIX,
    BEST_TRACKED,
    CELL_TAG,
    EPOCHS_TAG,
    ERROR_TAG,
    REPRESENTATIVES_PARAM,
    SEED_TAG,
    STATS_PARAM,
    STOPPED_EARLY_TAG,
    TIME_KEY,
    TRIAL_TAG,
    StudyRuns,
    config_from_params,
)
from cbtlab.train.segmentation import build_segmentation_model
from cbtlab.tune.budget import common_budget, with_budget_values
from cbtlab.tune.stats import cell_label, mean_ci

# Latest values copied into the table when a run logs them (a classifier's top-1/top-5, a
# segmenter's mIoU and pixel accuracy), and the best of each the trial tracked.
LATEST_METRICS = (
    "val/top1", "val/top5", "val/miou", "val/pixel_acc", "val/loss", "train/loss", "train/top1",
)  # fmt: skip
BEST_METRICS = tuple(BEST_PREFIX + name for name in BEST_TRACKED)
# A FLOP count some writer may log (metric or param); otherwise counted from the run's config.
LOGGED_FLOPS = ("flops", "model/flops", "model.flops")
# A segmentation run logs its decoder's share (cbtlab.train.segmentation): the x of its Pareto
# figure, as the paper's Fig. 8 plots mIoU against decoder FLOPs.
DECODER_FLOPS = "model/decoder_flops"
RC_PATTERN = re.compile(r"^rc/layer_(\d+)$")

# The table's fixed columns and their types; the factors follow `cell`, `rc/layer_XX` come last.
TABLE_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "trial": pa.string(),
    "trial_id": pa.string(),
    "order": pa.int64(),
    "status": pa.string(),
    "stopped_early": pa.bool_(),
    "complete": pa.bool_(),
    "epochs": pa.int64(),
    "seconds": pa.float64(),
    "start_time": pa.timestamp("ms", tz="UTC"),
    "cell": pa.string(),
    "seed": pa.int64(),
    "attention": pa.string(),
    "representatives": pa.int64(),
    "final": pa.float64(),
    "best": pa.float64(),
    "value": pa.float64(),
    "value_epoch": pa.int64(),
    **{name: pa.float64() for name in (*LATEST_METRICS, *BEST_METRICS)},
    "throughput_img_s": pa.float64(),
    "flops": pa.float64(),
    "flops_source": pa.string(),
    "n_params": pa.int64(),
    "probe_run_id": pa.string(),
    "rc_source": pa.string(),
    "error": pa.string(),
}


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class FlopCounter:
    """FLOPs and parameter counts of trials' models, from their configs (on the meta device,
    so any size costs nothing), cached per model config."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, int | None, str]] = {}

    def __call__(self, params: dict[str, str]) -> tuple[float, int | None, str]:
        """(forward FLOPs per image, parameter count, error message or "")."""
        model_params = {k: v for k, v in params.items() if k.startswith(("model.", "task."))}
        key = json.dumps(model_params, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self._count(params)
        return self._cache[key]

    @staticmethod
    def _count(params: dict[str, str]) -> tuple[float, int | None, str]:
        try:
            whole = config_from_params(params)
            cfg = whole.model
            with torch.device("meta"):
                # a segmentation run's model is its encoder + decoder
                seg = whole.task.segmentation
                model = build_segmentation_model(whole) if seg else build_model(cfg)
            flops = count_flops(model, cfg.img_size, in_chans=cfg.in_chans)
            return float(flops), sum(p.numel() for p in model.parameters()), ""
        except Exception as exc:  # a config this version cannot build: say so, go on
            return math.nan, None, f"{type(exc).__name__}: {exc}"


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def equal_budget(runs: StudyRuns) -> bool:
    """Whether the study's values are taken at one budget: a grid, or a search that logged
    `study.stats` (every search since studies compare at a budget). An older search keeps
    each trial's best over its own epochs."""
    return runs.grid or STATS_PARAM in runs.parent.data.params


@dataclass
class Comparison:
    """Where the report compares a study's trials: at which budget, which value there, which
    trials have one and which are left out."""

    metric: str
    kind: str  # "final" or "best"
    budget: int | None  # None: no finished trial yet, or an older search (`equal` False)
    equal: bool  # the values are at one budget (see `equal_budget`)
    compared: list[str]  # the trials with a value
    left_out: list[str]  # "trial (why)" of the trials without one
    reached: dict[str, int]  # the epochs of the metric each compared trial reached

    @property
    def metric_at(self) -> str:
        """The metric and where it is taken: "val/top1 at epoch 6"."""
        if not self.equal:
            return f"{self.metric} over each trial's own epochs"
        if self.budget is None:
            return f"{self.metric} (no budget: no trial finished with it)"
        return f"{self.metric} at epoch {self.budget}"

    @property
    def label(self) -> str:
        """What `value` is, in words: "final val/top1 at epoch 6"."""
        return f"{self.kind} {self.metric_at}"

    @property
    def ran_further(self) -> list[str]:
        """The compared trials that ran past the budget."""
        if self.budget is None:
            return []
        return [t for t, epochs in self.reached.items() if epochs > self.budget]


def comparison(runs: StudyRuns, rows: Sequence[dict[str, Any]]) -> Comparison:
    """The comparison of `trial_rows`'s rows (their `value`, `value_epoch` and `history`)."""
    equal = equal_budget(runs)
    budget = common_budget(rows) if equal else None
    compared, left_out = [], []
    for r in rows:
        if math.isfinite(_float(r["value"])):
            compared.append(r["trial"])
            continue
        if r["status"] != "FINISHED":
            why = r["status"]
        elif not r["history"]:
            why = f"finished without {runs.metric}"
        else:
            why = f"finished without {runs.metric} at epoch {budget}"
        left_out.append(f"{r['trial']} ({why})")
    reached = {
        r["trial"]: max(r["history"], default=r["epochs"]) for r in rows if r["trial"] in compared
    }
    return Comparison(runs.metric, runs.value_kind, budget, equal, compared, left_out, reached)


def _set_values(runs: StudyRuns, rows: list[dict[str, Any]]) -> None:
    """Each row's `value` and `value_epoch` (see the module docstring)."""
    if not equal_budget(runs):  # an older search: each finished trial's own best
        for row in rows:
            row["value"] = row["best"] if row["status"] == "FINISHED" else math.nan
            row["value_epoch"] = None
        return
    budget = common_budget(rows)
    with_budget_values(rows, budget, runs.value_kind, runs.mode)
    for row in rows:
        at = row.pop("at_budget")
        row["value"] = math.nan if at is None else at
        row["value_epoch"] = None if at is None else budget


def trial_rows(runs: StudyRuns, flops: FlopCounter | None = None) -> list[dict[str, Any]]:
    """One dict per trial run (the table's rows, in start order); see `TABLE_COLUMNS`. Besides
    the columns a row has `history`, the study metric per epoch, {epoch: value}; its `value`
    is at the study's budget (see the module docstring and `comparison`)."""
    flops = flops or FlopCounter()
    rows = []
    for order, run in enumerate(runs.trials):
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        run_id = run.info.run_id
        history = runs.histories.get(run_id, {})
        curve = history.get(runs.metric, [])
        status = run.info.status
        stopped = tags.get(STOPPED_EARLY_TAG) == "true"
        epochs = _int(tags.get(EPOCHS_TAG))
        if epochs is None:
            epochs = max((step for step, _ in curve), default=0)
        final = metrics.get(runs.metric, math.nan)
        best = metrics.get(f"{BEST_PREFIX}{runs.metric}")
        if best is None:  # a running trial logs best/ only at its end
            values = [v for _, v in curve]
            pick = max if runs.mode == "max" else min
            best = pick(values) if values else math.nan
        complete = status == "FINISHED" and not stopped
        seconds = metrics.get(TIME_KEY)
        if seconds is None and run.info.end_time and run.info.start_time:
            seconds = (run.info.end_time - run.info.start_time) / 1000
        throughput = [v for _, v in history.get("throughput/train_img_s", [])]
        logged = next(
            (_float({**params, **metrics}[k]) for k in LOGGED_FLOPS if k in metrics or k in params),
            None,
        )
        counted, n_params, flops_error = flops(params)
        flops_source = "logged" if logged is not None else ("" if flops_error else "config")
        if DECODER_FLOPS in metrics:
            logged, flops_source = _float(metrics[DECODER_FLOPS]), "decoder"
        seed = _int(params.get("train.seed", tags.get(SEED_TAG)))
        factor_values = {key: params.get(key) for key in runs.factors}
        probe = runs.probes.get(run_id)
        rc_trial = _rc_metrics(metrics)
        rc_probe = _rc_metrics(probe.data.metrics) if probe is not None else {}
        row: dict[str, Any] = {
            "run_id": run_id,
            "trial": run.info.run_name or run_id,
            "trial_id": tags.get(TRIAL_TAG, ""),
            "order": order,
            "status": status,
            "stopped_early": stopped,
            "complete": complete,
            "epochs": epochs,
            "seconds": math.nan if seconds is None else float(seconds),
            "start_time": run.info.start_time,
            "cell": tags.get(CELL_TAG) or cell_label(factor_values),
            "factors": factor_values,
            "seed": seed,
            "attention": params.get("model.attention", ""),
            "representatives": _int(params.get(REPRESENTATIVES_PARAM)),
            "final": final,
            "best": best,
            "value": math.nan,  # set by _set_values below, at the study's budget
            "value_epoch": None,
            "history": {int(step): float(v) for step, v in curve},
            **{k: metrics.get(k, math.nan) for k in (*LATEST_METRICS, *BEST_METRICS)},
            "throughput_img_s": sum(throughput) / len(throughput) if throughput else math.nan,
            "flops": logged if logged is not None else counted,
            "flops_source": flops_source,
            "flops_error": flops_error,
            "n_params": n_params,
            "probe_run_id": probe.info.run_id if probe is not None else "",
            "rc_source": "probe" if rc_probe else ("training" if rc_trial else ""),
            "rc": rc_probe or rc_trial,
            "error": _error_line(tags.get(ERROR_TAG, "")),
        }
        rows.append(row)
    _set_values(runs, rows)
    return rows


def _rc_metrics(metrics: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in metrics.items():
        match = RC_PATTERN.match(key)
        if match and math.isfinite(value):
            out[int(match.group(1))] = value
    return out


def _factor_array(values: list[Any]) -> pa.Array:
    """Param strings as ints or floats when every present value parses, else as strings."""
    for cast, kind in ((int, pa.int64()), (float, pa.float64())):
        try:
            return pa.array([None if v is None else cast(v) for v in values], kind)
        except (TypeError, ValueError):
            continue
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def trial_table(runs: StudyRuns, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """The rows as a pyarrow Table: `TABLE_COLUMNS`, one column per factor after `cell`, then
    `rc/layer_XX` for every layer any trial logged. Metadata: study, parent run, metric, mode,
    value kind, budget (the epoch `value` is at; "" when none), equal_budget ("false": an
    older search, `value` over each trial's own epochs), value_label (`Comparison.label`),
    factors (JSON)."""
    compare = comparison(runs, rows)
    columns: dict[str, pa.Array] = {}
    for name, kind in TABLE_COLUMNS.items():
        columns[name] = pa.array([_cell(r[name], kind) for r in rows], kind)
        if name == "cell":
            for factor in runs.factors:
                if factor in TABLE_COLUMNS:
                    continue
                columns[factor] = _factor_array([r["factors"][factor] for r in rows])
    layers = sorted({layer for r in rows for layer in r["rc"]})
    for layer in layers:
        columns[f"rc/layer_{layer:02d}"] = pa.array(
            [r["rc"].get(layer, math.nan) for r in rows], pa.float64()
        )
    metadata = {
        "study": runs.name,
        "parent_run_id": runs.parent_run_id,
        "experiment": runs.experiment_name,
        "metric": runs.metric,
        "mode": runs.mode,
        "value": runs.value_kind,
        "budget": "" if compare.budget is None else str(compare.budget),
        "equal_budget": str(compare.equal).lower(),
        "value_label": compare.label,
        "factors": json.dumps(runs.factors),
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def _cell(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_floating(kind):
        return _float(value)
    return value


def study_notes(runs: StudyRuns, rows: Sequence[dict[str, Any]]) -> list[str]:
    """What is missing or partial in the study's data, one sentence each."""
    notes = list(runs.notes)
    status = runs.parent.info.status
    if status == "RUNNING":
        notes.append(
            f"the study is still running (parent run RUNNING): this report shows the "
            f"{len(rows)} trials logged so far"
        )
    elif status != "FINISHED":
        notes.append(f"the study ended {status}: trials that did not run are missing")
    if not rows:
        notes.append("no trial runs yet: nothing to draw")
        return notes
    by_status: dict[str, list[str]] = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r["trial"])
    for state in ("FAILED", "KILLED"):
        names = by_status.get(state, [])
        if names:
            errors = {r["trial"]: r["error"] for r in rows if r["status"] == state and r["error"]}
            detail = "; ".join(f"{n}: {e}" for n, e in list(errors.items())[:3])
            notes.append(
                f"{len(names)} trial(s) {state}, left out of the values and statistics: "
                f"{_names(names)}" + (f" ({detail})" if detail else "")
            )
    running = by_status.get("RUNNING", [])
    if running:
        notes.append(
            f"{len(running)} trial(s) still running, drawn with the epochs logged so far and "
            f"left out of the values: {_names(running)}"
        )
    notes += _budget_notes(comparison(runs, rows), rows)
    missing = [r["trial"] for r in rows if not math.isfinite(_float(r["final"]))]
    if missing:
        notes.append(f"{runs.metric} is missing in {len(missing)} run(s): {_names(missing)}")
    seeds_per_cell: dict[str, set[Any]] = {}
    for r in rows:
        if math.isfinite(_float(r["value"])):
            seeds_per_cell.setdefault(r["cell"], set()).add((r["seed"], r["run_id"]))
    single = [cell for cell, seeds in seeds_per_cell.items() if len(seeds) < 2]
    if seeds_per_cell and len(single) == len(seeds_per_cell):
        notes.append("one value per cell (a single seed): no confidence bands or intervals")
    elif single:
        notes.append(f"one value only, so no interval, for: {_names(single)}")
    no_value = sorted({r["cell"] for r in rows} - set(seeds_per_cell))
    if no_value:
        notes.append(f"no usable {runs.metric} value for cell(s): {_names(no_value)}")
    errors = {r["flops_error"] for r in rows if r["flops_error"]}
    if errors:
        notes.append(
            f"FLOPs could not be counted for some configs: {'; '.join(sorted(errors))[:300]}"
        )
    if not any(math.isfinite(_float(r["throughput_img_s"])) for r in rows):
        notes.append("no throughput/train_img_s logged: no accuracy-throughput figure")
    if not any(r["rc"] for r in rows):
        notes.append(
            "no rc/layer_XX metrics (trials ran with train.probe_every=0 and no probe runs): "
            "no compression figure"
        )
    if not runs.probes:
        notes.append(
            "no probe runs under the trials: no attention maps (run "
            "studies/interpretability_probe.py --run-id TRIAL_RUN_ID)"
        )
    return notes


def _budget_notes(compare: Comparison, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where the values are not every trial's, or not at one budget."""
    notes = []
    stopped = [r["trial"] for r in rows if r["stopped_early"]]
    if not compare.equal:
        finished = [r["epochs"] for r in rows if r["status"] == "FINISHED"]
        spread = (
            f" (they ran {min(finished)} to {max(finished)} epochs)"
            if finished and min(finished) != max(finished)
            else ""
        )
        notes.append(
            f"this search was logged before studies compared their trials at one budget (no "
            f"{STATS_PARAM} param): each value is a trial's best over its own epochs, so the "
            f"values may be at unequal budgets{spread}"
        )
        if stopped:
            notes.append(
                f"{len(stopped)} trial(s) stopped early by the scheduler (their best is over "
                "fewer epochs)"
            )
        return notes
    if compare.left_out:
        where = f"at epoch {compare.budget}" if compare.budget is not None else "(no budget)"
        notes.append(
            f"{len(compare.left_out)} trial(s) left out of the comparison {where}, no value: "
            + _names(compare.left_out)
        )
    if stopped:
        notes.append(
            f"{len(stopped)} trial(s) stopped early by the scheduler, compared at epoch "
            f"{compare.budget} like every trial (their own final and best are over fewer "
            f"epochs): {_names(stopped)}"
        )
    further = compare.ran_further
    if further:
        top = max(compare.reached[t] for t in further)
        notes.append(
            f"{len(further)} trial(s) ran past epoch {compare.budget} (to {top}): compared at "
            f"epoch {compare.budget}, the epoch every finished trial reached; their later "
            "values are in final and best only"
        )
    return notes


def _names(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class CellSummary:
    """A cell's values over its seeds (the trials with a value at the budget)."""

    label: str
    factors: dict[str, Any]
    values: list[float]
    seeds: list[int | None]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    flops: float
    throughput: float
    rc: dict[int, float]  # layer -> mean Rc over the cell's trials that logged it

    @property
    def n(self) -> int:
        return len(self.values)


def cell_summaries(rows: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[CellSummary]:
    """Per cell (in order of first appearance): mean, std and Student-t interval of `value`
    (`cbtlab.tune.stats.mean_ci`, as stats.parquet computes them), FLOPs, mean throughput and
    mean Rc per layer."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(r["cell"], []).append(r)
    out = []
    for label, members in grouped.items():
        used = [r for r in members if math.isfinite(_float(r["value"]))]
        values = [float(r["value"]) for r in used]
        mean, std, low, high = mean_ci(values, confidence)
        flops = [_float(r["flops"]) for r in members if math.isfinite(_float(r["flops"]))]
        speed = [
            _float(r["throughput_img_s"])
            for r in used
            if math.isfinite(_float(r["throughput_img_s"]))
        ]
        layers = sorted({layer for r in members for layer in r["rc"]})
        rc = {}
        for layer in layers:
            vals = [r["rc"][layer] for r in members if layer in r["rc"]]
            rc[layer] = sum(vals) / len(vals)
        out.append(
            CellSummary(
                label=label,
                factors=dict(members[0]["factors"]),
                values=values,
                seeds=[r["seed"] for r in used],
                mean=mean,
                std=std,
                ci_low=low,
                ci_high=high,
                flops=flops[0] if flops else math.nan,
                throughput=sum(speed) / len(speed) if speed else math.nan,
                rc=rc,
            )
        )
    return out


def check_against_stats(cells: Sequence[CellSummary], stats: pa.Table) -> list[str]:
    """Differences between the cells' values from the runs and the study's stats.parquet
    (n, mean and interval per cell); [] when they agree."""
    problems = []
    by_label = {c.label: c for c in cells}
    for row in stats.to_pylist():
        cell = by_label.get(row["cell"])
        if cell is None:
            problems.append(f"stats.parquet has cell {row['cell']!r}, the runs do not")
            continue
        if row["n"] != cell.n:
            problems.append(f"{row['cell']}: n {row['n']} in stats.parquet, {cell.n} in the runs")
            continue
        for name, ours in (("mean", cell.mean), ("ci_low", cell.ci_low), ("ci_high", cell.ci_high)):
            theirs = row[name]
            if math.isnan(theirs) and math.isnan(ours):
                continue
            if not math.isclose(theirs, ours, rel_tol=1e-9, abs_tol=1e-12):
                problems.append(
                    f"{row['cell']}: {name} {theirs:.6g} in stats.parquet, {ours:.6g} in the runs"
                )
    return problems
