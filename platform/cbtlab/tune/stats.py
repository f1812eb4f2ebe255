"""Statistics of a repeated-seed study: each cell's mean and CI, paired tests against a baseline.

A *cell* is one assignment of the studied factors (`{"model.attention": "cbsa"}`); cells pair
up with the baseline seed by seed.

Per cell (one row of the table, the baseline's row included):
  n, mean, std (ddof 1) and a t-interval of the mean at `confidence` (default 95 %).
Per cell against the baseline (NaN on the baseline's row), over the seeds both have:
  n_pairs, the mean paired difference (cell - baseline) with its t-interval, a two-sided
  paired t-test and Wilcoxon signed-rank test, the p-value of the chosen test, Holm-corrected
  over all the comparisons of the table, and Cohen's d_z = mean(diff) / std(diff).
The test (`test`): "t", "wilcoxon", or "auto": the t-test below `WILCOXON_MIN_PAIRS` pairs,
Wilcoxon from there; both p-values are always in the table (`p_t`, `p_wilcoxon`).

Edge cases give NaN and a `note`, never an exception:
- a cell with one seed (or one pair): no std, CI or test;
- a failed trial (value None or NaN) is left out; its cell's `n` counts the others, and it
  pairs with nothing (`n_pairs` counts the seeds present in both cells, `n_failed` the rest);
- every paired difference zero (the cell equals the baseline on every seed): the
  difference's CI is [0, 0], p = 1 for both tests and d_z = 0;
- every paired difference the same non-zero c: zero variance, so the t statistic and d_z are
  undefined (NaN; the difference's CI is [c, c]); Wilcoxon is still defined (all signs agree).
Paired differences are rounded to `DIFF_DECIMALS` decimals first (float noise neither invents
a variance nor breaks a tie).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cbtlab.tables import render_table

TESTS = ("auto", "t", "wilcoxon")
WILCOXON_MIN_PAIRS = 6
DIFF_DECIMALS = 12
NAN = float("nan")

# The table's columns; the factors' columns follow `cell`. Types other than float64:
COLUMN_ORDER = (
    "cell", "is_baseline", "seeds", "n", "n_failed", "mean", "std", "ci_low", "ci_high",
    "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "test", "statistic", "p_t",
    "p_wilcoxon", "p_value", "p_holm", "effect_dz", "note",
)  # fmt: skip
COLUMN_TYPES = {
    "is_baseline": pa.bool_(), "seeds": pa.list_(pa.int64()), "n": pa.int64(),
    "n_failed": pa.int64(), "n_pairs": pa.int64(), "test": pa.string(), "note": pa.string(),
}  # fmt: skip


class Observation(NamedTuple):
    """One trial's result: its cell, its seed and the metric (None or NaN: the trial failed)."""

    cell: Mapping[str, Any]
    seed: int
    value: float | None


def cell_label(cell: Mapping[str, Any]) -> str:
    """`key=value, key=value`: a cell's name in tables and notes."""
    return ", ".join(f"{key}={value}" for key, value in cell.items())


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std with ddof 1, CI low, CI high) of `values` with a Student-t interval; std and
    the interval are NaN below two values. Equal values give a zero-width interval."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return NAN, NAN, NAN, NAN
    mean = float(x.mean())
    if x.size < 2:
        return mean, NAN, NAN, NAN
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return mean, std, mean - half, mean + half


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (family-wise error); NaN entries stay NaN and
    do not count as comparisons."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [NAN] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_comparison(
    diffs: Sequence[float], *, test: str = "auto", confidence: float = 0.95
) -> dict[str, Any]:
    """The paired statistics of the differences cell - baseline over common seeds: n_pairs,
    diff_mean and its CI, the test used, its statistic, p_t, p_wilcoxon, p_value, effect_dz and
    a note (see the module docstring for the edge cases)."""
    from scipy import stats

    if test not in TESTS:
        raise ValueError(f"test {test!r} is not one of {', '.join(TESTS)}")
    d = np.round(np.asarray(diffs, dtype=float), DIFF_DECIMALS)
    n = int(d.size)
    chosen = test if test != "auto" else ("t" if n < WILCOXON_MIN_PAIRS else "wilcoxon")
    out: dict[str, Any] = {
        "n_pairs": n,
        "diff_mean": NAN,
        "diff_ci_low": NAN,
        "diff_ci_high": NAN,
        "test": "",
        "statistic": NAN,
        "p_t": NAN,
        "p_wilcoxon": NAN,
        "p_value": NAN,
        "effect_dz": NAN,
        "note": "",
    }
    if n == 0:
        out["note"] = "no seed in common with the baseline"
        return out
    mean, std, low, high = mean_ci(d, confidence)
    out.update(diff_mean=mean, diff_ci_low=low, diff_ci_high=high)
    if n < 2:
        out["note"] = "one pair: no CI or test"
        return out
    out["test"] = chosen
    if np.all(d == 0):
        out.update(statistic=0.0, p_t=1.0, p_wilcoxon=1.0, p_value=1.0, effect_dz=0.0)
        out["note"] = "equal to the baseline on every seed"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wilcoxon = stats.wilcoxon(d)
    out["p_wilcoxon"] = float(wilcoxon.pvalue)
    if np.all(d == d[0]):
        # A constant shift: std 0, so t and d_z are infinite; the t-interval has zero width.
        out.update(diff_ci_low=mean, diff_ci_high=mean)
        out["note"] = f"every paired difference is {d[0]:g}: zero variance, no t-test or d_z"
        if chosen == "wilcoxon":
            out.update(statistic=float(wilcoxon.statistic), p_value=out["p_wilcoxon"])
        return out
    t = stats.ttest_1samp(d, 0.0)
    out["p_t"] = float(t.pvalue)
    out["effect_dz"] = mean / std
    if chosen == "t":
        out.update(statistic=float(t.statistic), p_value=out["p_t"])
    else:
        out.update(statistic=float(wilcoxon.statistic), p_value=out["p_wilcoxon"])
    return out


def compare_cells(
    observations: Iterable[Observation],
    *,
    baseline: Mapping[str, Any] | None = None,
    test: str = "auto",
    confidence: float = 0.95,
    metric: str = "",
) -> pa.Table:
    """One row per cell (in order of first appearance) with its statistics and its paired
    comparison with `baseline` (default: the first cell). Columns: `cell`, one column per
    factor, `is_baseline`, `seeds`, `n`, `n_failed`, `mean`, `std`, `ci_low`, `ci_high`,
    `n_pairs`, `diff_mean`, `diff_ci_low`, `diff_ci_high`, `test`, `statistic`, `p_t`,
    `p_wilcoxon`, `p_value`, `p_holm`, `effect_dz`, `note`. The schema's metadata holds
    `metric`, `baseline`, `test` and `confidence`."""
    if test not in TESTS:
        raise ValueError(f"test {test!r} is not one of {', '.join(TESTS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    factors, cells, by_cell, failed = _group_by_cell(observations)
    base_key = _baseline_key(baseline, factors, cells)
    rows = [
        _cell_row(
            cell,
            factors,
            by_cell[key],
            failed[key],
            by_cell[base_key],
            is_baseline=key == base_key,
            test=test,
            confidence=confidence,
        )
        for key, cell in cells.items()
    ]
    for row, adjusted in zip(
        rows, holm([r["p_value"] if not r["is_baseline"] else NAN for r in rows]), strict=True
    ):
        row["p_holm"] = adjusted
    return _to_table(rows, factors, cell_label(cells[base_key]), test, confidence, metric)


def _group_by_cell(
    observations: Iterable[Observation],
) -> tuple[
    list[str],
    dict[tuple[Any, ...], dict[str, Any]],
    dict[tuple[Any, ...], dict[int, float]],
    dict[tuple[Any, ...], list[int]],
]:
    """(factors, cell key -> cell, cell key -> {seed: value}, cell key -> failed seeds), the
    cells in order of first appearance."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    by_cell: dict[tuple[Any, ...], dict[int, float]] = {}
    failed: dict[tuple[Any, ...], list[int]] = {}
    factors: list[str] | None = None
    for obs in observations:
        if factors is None:
            factors = list(obs.cell)
        if list(obs.cell) != factors:
            raise ValueError(f"cell {cell_label(obs.cell)} does not assign {factors}")
        key = tuple(obs.cell[f] for f in factors)
        cells.setdefault(key, dict(obs.cell))
        values = by_cell.setdefault(key, {})
        failed.setdefault(key, [])
        if obs.value is None or not math.isfinite(obs.value):
            failed[key].append(obs.seed)
            continue
        if obs.seed in values:
            raise ValueError(f"seed {obs.seed} appears twice in cell {cell_label(obs.cell)}")
        values[obs.seed] = float(obs.value)
    if factors is None:
        raise ValueError("no observations")
    return factors, cells, by_cell, failed


def _baseline_key(
    baseline: Mapping[str, Any] | None,
    factors: list[str],
    cells: Mapping[tuple[Any, ...], Mapping[str, Any]],
) -> tuple[Any, ...]:
    """The key of the baseline cell (None: the first cell); ValueError if it is not a cell."""
    if baseline is None:
        return next(iter(cells))
    base_key = tuple(baseline.get(f) for f in factors)
    if set(baseline) != set(factors) or base_key not in cells:
        raise ValueError(
            f"baseline {cell_label(baseline)} is not one of the cells: "
            + "; ".join(cell_label(c) for c in cells.values())
        )
    return base_key


def _cell_row(
    cell: Mapping[str, Any],
    factors: list[str],
    values: Mapping[int, float],
    failed: list[int],
    base_values: Mapping[int, float],
    *,
    is_baseline: bool,
    test: str,
    confidence: float,
) -> dict[str, Any]:
    """One cell's row: its own statistics, its comparison with the baseline, its notes (the
    Holm-corrected p-value is left to the caller)."""
    mean, std, low, high = mean_ci(list(values.values()), confidence)
    notes = []
    if not values:
        notes.append("no finished trial")
    elif len(values) == 1:
        notes.append("one seed: no CI")
    if failed:
        notes.append(f"failed seeds {sorted(failed)}")
    row: dict[str, Any] = {
        "cell": cell_label(cell),
        **{f"factor:{f}": cell[f] for f in factors},
        "is_baseline": is_baseline,
        "seeds": sorted(values),
        "n": len(values),
        "n_failed": len(failed),
        "mean": mean,
        "std": std,
        "ci_low": low,
        "ci_high": high,
    }
    if is_baseline:
        comparison = paired_comparison([], test=test, confidence=confidence)
        comparison["note"] = ""
    else:
        common = sorted(set(values) & set(base_values))
        comparison = paired_comparison(
            [values[s] - base_values[s] for s in common], test=test, confidence=confidence
        )
        unpaired = sorted(set(values) ^ set(base_values))
        if unpaired:
            notes.append(f"unpaired seeds {unpaired} left out of the comparison")
    notes.append(comparison.pop("note"))
    row["note"] = "; ".join(n for n in notes if n)
    return {**row, **comparison}


def _to_table(
    rows: list[dict[str, Any]],
    factors: list[str],
    baseline_label: str,
    test: str,
    confidence: float,
    metric: str,
) -> pa.Table:
    columns: dict[str, pa.Array] = {"cell": pa.array([r["cell"] for r in rows], pa.string())}
    for factor in factors:
        values = [r[f"factor:{factor}"] for r in rows]
        try:
            columns[factor] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable
            columns[factor] = pa.array([str(v) for v in values])
    for name in COLUMN_ORDER[1:]:
        columns[name] = pa.array([r[name] for r in rows], COLUMN_TYPES.get(name, pa.float64()))
    metadata = {
        "metric": metric,
        "baseline": baseline_label,
        "test": test,
        "confidence": str(confidence),
        "factors": ",".join(factors),
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def write_stats(table: pa.Table, path: str | Path) -> Path:
    """Write the statistics table as Parquet (its metadata kept); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _num(value: float, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def format_stats(table: pa.Table) -> str:
    """A plain-text table: per cell mean ± CI half-width, the difference to the baseline with
    its CI, the test and its raw and Holm-corrected p-values, d_z and the notes."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    confidence = float(meta.get("confidence", "0.95"))
    level = f"{confidence * 100:g}%"
    metric = meta.get("metric") or "value"
    headers = ["cell", "n", f"{metric} mean ± {level} CI", f"diff vs baseline [{level} CI]",
               "test", "p", "p (Holm)", "d_z", "note"]  # fmt: skip
    body = []
    for row in table.to_pylist():
        if math.isnan(row["mean"]):
            mean = "-"
        elif math.isnan(row["ci_low"]):
            mean = _num(row["mean"])
        else:
            mean = f"{_num(row['mean'])} ± {_num((row['ci_high'] - row['ci_low']) / 2)}"
        if row["is_baseline"]:
            diff = "(baseline)"
        elif math.isnan(row["diff_mean"]):
            diff = "-"
        elif math.isnan(row["diff_ci_low"]):
            diff = f"{row['diff_mean']:+.4f}"
        else:
            diff = (
                f"{row['diff_mean']:+.4f} [{row['diff_ci_low']:+.4f}, {row['diff_ci_high']:+.4f}]"
            )
        body.append(
            [
                row["cell"],
                str(row["n"]),
                mean,
                diff,
                row["test"] or "-",
                _p(row["p_value"]),
                _p(row["p_holm"]),
                _num(row["effect_dz"], 2),
                row["note"],
            ]
        )
    return render_table(headers, body)
