"""A study as MLflow holds it, read back into one table: one row per trial run.

`load_study` finds a study's parent run (by study name or run id, on any tracking URI), its
trial runs (children by `mlflow.parentRunId`), the probe runs nested under those trials
(`cbtlab.role=probe`) and the per-epoch histories the figures need. `trial_table` turns that
into a pyarrow Table (`TABLE_COLUMNS` first, then one column per searched factor after `cell`,
then `rc/layer_XX` columns when logged); `study_notes` lists what is missing or partial.

The per-trial *value* (the column `value`) is what the report plots and averages over seeds:
- a grid (`study.searcher=grid`): the metric the study's statistics use (`study.stats`,
  `final` by default: the metric at the last epoch), for complete trials only (finished, not
  stopped early), exactly as `cbtlab.tune.study.study_statistics` feeds `stats.parquet`;
- a search: each finished trial's best value of the metric (the summary table's ranking),
  trials stopped early by ASHA included (the figures mark them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cbtlab.tracking.mlflow_tracker import PARENT_TAG
from cbtlab.tune.stats import cell_label

ROLE_TAG = "cbtlab.role"
STUDY_TAG = "cbtlab.study"
# Metrics drawn per epoch besides the study's own metric.
HISTORY_METRICS = ("train/loss", "throughput/train_img_s")
# Latest values copied into the table when a run logs them.
LATEST_METRICS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")
BEST_METRICS = ("best/val/top1", "best/val/top5", "best/val/loss")
# A FLOP count some writer may log (metric or param); otherwise counted from the run's config.
LOGGED_FLOPS = ("flops", "model/flops", "model.flops")
RC_PATTERN = re.compile(r"^rc/layer_(\d+)$")
MAX_RESULTS = 50_000

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
    **{name: pa.float64() for name in (*LATEST_METRICS, *BEST_METRICS)},
    "throughput_img_s": pa.float64(),
    "flops": pa.float64(),
    "flops_source": pa.string(),
    "n_params": pa.int64(),
    "probe_run_id": pa.string(),
    "rc_source": pa.string(),
    "error": pa.string(),
}


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
        return self.parent.data.params.get("study.baseline", "")


def find_parent(client: MlflowClient, study: str | None, parent_run_id: str | None) -> Run:
    """The study's parent run: `parent_run_id`, else the latest run tagged as the study `study`
    (looked up in the experiment of that name first, then in every experiment)."""
    if parent_run_id:
        return client.get_run(parent_run_id)
    if not study:
        raise ValueError("give a study name or a parent run id")
    query = f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study}'"
    order = ["attributes.start_time DESC"]
    named = client.get_experiment_by_name(study)
    if named is not None:
        found = client.search_runs([named.experiment_id], query, order_by=order, max_results=1)
        if found:
            return found[0]
    ids, token = [], None
    while True:  # every experiment, page by page (a tracking server caps a page)
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    found = client.search_runs(ids, query, order_by=order, max_results=1) if ids else []
    if not found:
        raise LookupError(f"no study run named {study!r} at {client.tracking_uri}")
    return found[0]


def _parse_metric(params: dict[str, str]) -> tuple[str, str]:
    metric, _, mode = params.get("study.metric", "val/top1:max").rpartition(":")
    return (metric or "val/top1"), (mode if mode in ("max", "min") else "max")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run_id, key)
    latest: dict[int, tuple[int, float]] = {}
    for m in points:  # one point per step: the latest written
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def load_study(
    tracking_uri: str, study: str | None = None, parent_run_id: str | None = None
) -> StudyRuns:
    """Read a study (its latest invocation unless `parent_run_id` is given) from MLflow."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, study, parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    params, tags = parent.data.params, parent.data.tags
    notes: list[str] = []
    if tags.get(ROLE_TAG, "study") != "study":
        notes.append(
            f"run {parent.info.run_id} is not a study's parent run (role {tags[ROLE_TAG]})"
        )
    metric, mode = _parse_metric(params)
    grid = params.get("study.searcher") == "grid"
    value_kind = params.get("study.stats", "auto:final").rpartition(":")[2] if grid else "best"
    value_kind = value_kind if value_kind in ("final", "best") else "final"

    trials = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=MAX_RESULTS,
    )
    trials = [t for t in trials if t.data.tags.get(ROLE_TAG, "trial") == "trial"]
    trials.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))

    try:
        factors = list(json.loads(params["study.space"]))
    except (KeyError, ValueError):
        factors = _varying_params(trials)
        notes.append(
            "the parent run has no study.space param: the factors are the params that vary "
            f"between trials ({', '.join(factors) or 'none'})"
        )

    trial_ids = {t.info.run_id for t in trials}
    probes: dict[str, Run] = {}
    if trial_ids:
        for run in client.search_runs(
            [experiment.experiment_id],
            f"tags.`{ROLE_TAG}` = 'probe'",
            order_by=["attributes.start_time ASC"],
            max_results=MAX_RESULTS,
        ):
            probed = run.data.tags.get(PARENT_TAG) or run.data.tags.get("cbtlab.probed_run")
            if probed in trial_ids and run.info.status == "FINISHED":
                probes[probed] = run  # ascending start time: the latest wins

    histories = {
        t.info.run_id: {
            key: _history(client, t.info.run_id, key)
            for key in dict.fromkeys((metric, *HISTORY_METRICS))
        }
        for t in trials
    }
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
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
        probes=probes,
        histories=histories,
        artifacts=artifacts,
        notes=notes,
    )


def _varying_params(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    skip = {"train.seed", "model.num_representatives"}
    return [k for k in keys if k not in skip and len({r.data.params.get(k) for r in runs}) > 1]


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
        model_params = {k: v for k, v in params.items() if k.startswith("model.")}
        key = json.dumps(model_params, sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self._count(params)
        return self._cache[key]

    @staticmethod
    def _count(params: dict[str, str]) -> tuple[float, int | None, str]:
        import torch

        from cbtlab.analysis import count_flops
        from cbtlab.analysis.interpretability import config_from_params
        from cbtlab.models import build_model

        try:
            cfg = config_from_params(params).model
            with torch.device("meta"):
                model = build_model(cfg)
            flops = count_flops(model, cfg.img_size, in_chans=cfg.in_chans)
            return float(flops), sum(p.numel() for p in model.parameters()), ""
        except Exception as exc:  # a config this version cannot build: say so, go on
            return math.nan, None, f"{type(exc).__name__}: {exc}"


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def trial_rows(runs: StudyRuns, flops: FlopCounter | None = None) -> list[dict[str, Any]]:
    """One dict per trial run (the table's rows, in start order); see `TABLE_COLUMNS`."""
    flops = flops or FlopCounter()
    rows = []
    for order, run in enumerate(runs.trials):
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        run_id = run.info.run_id
        history = runs.histories.get(run_id, {})
        curve = history.get(runs.metric, [])
        status = run.info.status
        stopped = tags.get("cbtlab.stopped_early") == "true"
        epochs = _int(tags.get("cbtlab.epochs_completed"))
        if epochs is None:
            epochs = max((step for step, _ in curve), default=0)
        final = metrics.get(runs.metric, math.nan)
        best = metrics.get(f"best/{runs.metric}")
        if best is None:  # a running trial logs best/ only at its end
            values = [v for _, v in curve]
            pick = max if runs.mode == "max" else min
            best = pick(values) if values else math.nan
        complete = status == "FINISHED" and not stopped
        if runs.grid:
            value = (final if runs.value_kind == "final" else best) if complete else math.nan
        else:
            value = best if status == "FINISHED" else math.nan
        seconds = metrics.get("time/trial_s")
        if seconds is None and run.info.end_time and run.info.start_time:
            seconds = (run.info.end_time - run.info.start_time) / 1000
        throughput = [v for _, v in history.get("throughput/train_img_s", [])]
        logged = next(
            (_float({**params, **metrics}[k]) for k in LOGGED_FLOPS if k in metrics or k in params),
            None,
        )
        counted, n_params, flops_error = flops(params)
        flops_source = "logged" if logged is not None else ("" if flops_error else "config")
        seed = _int(params.get("train.seed", tags.get("cbtlab.seed")))
        factor_values = {key: params.get(key) for key in runs.factors}
        probe = runs.probes.get(run_id)
        rc_trial = _rc_metrics(metrics)
        rc_probe = _rc_metrics(probe.data.metrics) if probe is not None else {}
        row: dict[str, Any] = {
            "run_id": run_id,
            "trial": run.info.run_name or run_id,
            "trial_id": tags.get("cbtlab.trial_id", ""),
            "order": order,
            "status": status,
            "stopped_early": stopped,
            "complete": complete,
            "epochs": epochs,
            "seconds": math.nan if seconds is None else float(seconds),
            "start_time": run.info.start_time,
            "cell": tags.get("cbtlab.cell") or cell_label(factor_values),
            "factors": factor_values,
            "seed": seed,
            "attention": params.get("model.attention", ""),
            "representatives": _int(params.get("model.num_representatives")),
            "final": final,
            "best": best,
            "value": value,
            **{k: metrics.get(k, math.nan) for k in (*LATEST_METRICS, *BEST_METRICS)},
            "throughput_img_s": sum(throughput) / len(throughput) if throughput else math.nan,
            "flops": logged if logged is not None else counted,
            "flops_source": flops_source,
            "flops_error": flops_error,
            "n_params": n_params,
            "probe_run_id": probe.info.run_id if probe is not None else "",
            "rc_source": "probe" if rc_probe else ("training" if rc_trial else ""),
            "rc": rc_probe or rc_trial,
            "error": _error_line(tags.get("cbtlab.error", "")),
        }
        rows.append(row)
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
    value kind, factors (JSON)."""
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
    stopped = [r["trial"] for r in rows if r["stopped_early"]]
    if stopped:
        verb = "left out of the statistics" if runs.grid else "their best is over fewer epochs"
        notes.append(f"{len(stopped)} trial(s) stopped early by the scheduler ({verb})")
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


def _names(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class CellSummary:
    """A cell's values over its seeds (complete trials with a finite value only)."""

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
    from cbtlab.tune.stats import mean_ci

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
