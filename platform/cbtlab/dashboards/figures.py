"""The report's figures, drawn with matplotlib (Agg) from the trial rows and cell summaries of
`cbtlab.dashboards.runs`, and the search's figures drawn by Optuna's own
`optuna.visualization.matplotlib` from an Optuna study (`cbtlab.dashboards.search`). Each
function writes one PNG and returns its path; a cell keeps its colour in every figure
(`cell_colours`)."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import EngFormatter, MaxNLocator
from optuna.exceptions import ExperimentalWarning

from cbtlab.dashboards.runs import CellSummary

DPI = 110
GRID_PATTERN = re.compile(r"^(\d+)x(\d+)$")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def cell_colours(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per cell, in order (tab10, then tab20 for more than ten cells)."""
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def level_order(values: Sequence[Any]) -> tuple[list[Any], bool]:
    """A factor's distinct levels in drawing order, and whether they sit on a numeric axis:
    numbers sorted by value; grids 'HxW' sorted by H x W (categorical axis); anything else in
    order of first appearance (the study's own order of its cells)."""
    levels = list(dict.fromkeys(v for v in values if v is not None))
    try:
        return sorted(levels, key=float), True
    except (TypeError, ValueError):
        pass
    if levels and all(GRID_PATTERN.match(str(v)) for v in levels):
        return sorted(levels, key=lambda v: (math.prod(map(int, str(v).split("x"))), str(v))), False
    return levels, False


def metric_vs_factor(
    rows: Sequence[Mapping[str, Any]],
    cells: Sequence[CellSummary],
    factor: str,
    *,
    metric: str,
    value_kind: str,
    path: Path,
) -> Path:
    """The value against one factor: each trial as a dot, the mean over seeds as a line with
    its 95% interval as a band, one line per combination of the other factors."""
    plt = _plt()
    levels, numeric = level_order([c.factors.get(factor) for c in cells])
    position = {lv: (float(lv) if numeric else i) for i, lv in enumerate(levels)}
    others = [f for f in (cells[0].factors if cells else {}) if f != factor]
    series: dict[str, list[CellSummary]] = {}
    for cell in cells:
        key = ", ".join(f"{f}={cell.factors.get(f)}" for f in others)
        series.setdefault(key, []).append(cell)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    by_cell = {c.label: c for c in cells}
    for i, (key, members) in enumerate(series.items()):
        colour = cmap(i % 10)
        members = sorted(
            (c for c in members if c.factors.get(factor) in position),
            key=lambda c: position[c.factors[factor]],
        )
        xs = [position[c.factors[factor]] for c in members if _finite(c.mean)]
        means = [c.mean for c in members if _finite(c.mean)]
        ax.plot(xs, means, marker="o", color=colour, label=key or "mean over seeds")
        banded = [c for c in members if _finite(c.ci_low)]
        if banded:
            ax.fill_between(
                [position[c.factors[factor]] for c in banded],
                [c.ci_low for c in banded],
                [c.ci_high for c in banded],
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
    spread = 0.0 if numeric else 0.08
    for n, r in enumerate(rows):
        cell = by_cell.get(r["cell"])
        level = r["factors"].get(factor)
        if cell is None or level not in position or not _finite(r["value"]):
            continue
        key = ", ".join(f"{f}={cell.factors.get(f)}" for f in others)
        colour = cmap(list(series).index(key) % 10)
        x = position[level] + spread * (((n * 7919) % 11) / 10 - 0.5)
        hollow = r.get("stopped_early")
        ax.scatter(
            [x],
            [r["value"]],
            s=18,
            alpha=0.6,
            zorder=3,
            facecolors="none" if hollow else [colour],
            edgecolors=[colour],
        )
    if not numeric:
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_xlabel(factor)
    ax.set_ylabel(f"{value_kind} {metric}")
    ax.set_title(f"{value_kind} {metric} vs {factor}\nmean over seeds, 95% CI band, dots = trials")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def cell_bars(
    cells: Sequence[CellSummary],
    *,
    metric: str,
    value_kind: str,
    baseline: str,
    colours: Mapping[str, Any],
    path: Path,
) -> Path:
    """A bar per cell (variant): the mean with its 95% interval, the seeds as dots; the
    baseline hatched. The value axis is zoomed to the data (it need not start at 0)."""
    plt = _plt()
    shown = [c for c in cells if _finite(c.mean)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(shown) + 2), 4.4))
    xs = range(len(shown))
    for x, c in zip(xs, shown, strict=True):
        ax.bar(
            x,
            c.mean,
            color=colours.get(c.label),
            alpha=0.75,
            edgecolor="black",
            hatch="//" if c.label == baseline else None,
        )
        if _finite(c.ci_low):
            ax.errorbar(
                x,
                c.mean,
                yerr=[[c.mean - c.ci_low], [c.ci_high - c.mean]],
                color="black",
                capsize=5,
                linewidth=1.2,
            )
        ax.scatter([x] * len(c.values), c.values, color="black", s=12, zorder=3)
    lows = [v for c in shown for v in (c.ci_low, *c.values) if _finite(v)]
    highs = [v for c in shown for v in (c.ci_high, *c.values) if _finite(v)]
    if lows and highs:
        pad = max(1e-3, 0.15 * (max(highs) - min(lows)))
        ax.set_ylim(min(lows) - pad, max(highs) + pad)
    labels = [f"{_short(c.label)} (n={c.n})" for c in shown]
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{value_kind} {metric}")
    title = f"{value_kind} {metric} per cell: mean, 95% CI, seeds"
    ax.set_title(title + (f"\nbaseline (hatched): {baseline}" if baseline else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _short(label: str) -> str:
    """`model.attention=cbsa, model.depth=2` -> `attention=cbsa, depth=2`."""
    return re.sub(r"\b[a-z_]+\.", "", label)


def pareto_front(
    points: Sequence[tuple[float, float]], *, maximize_x: bool, maximize_y: bool
) -> list[int]:
    """Indices of the non-dominated points, in order of x (better x first... as drawn: by x).
    A point is dominated when another is at least as good on both axes and better on one."""
    sx = 1.0 if maximize_x else -1.0
    sy = 1.0 if maximize_y else -1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            sx * x2 >= sx * x and sy * y2 >= sy * y and (sx * x2 > sx * x or sy * y2 > sy * y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto(
    rows: Sequence[Mapping[str, Any]],
    cells: Sequence[CellSummary],
    *,
    x_of_row: str,
    x_of_cell: str,
    x_label: str,
    maximize_x: bool,
    metric: str,
    value_kind: str,
    mode: str,
    colours: Mapping[str, Any],
    path: Path,
    log_x: bool = False,
) -> Path:
    """The value against a cost (FLOPs) or a speed (throughput): trials as small dots, cells
    as their mean with the 95% interval, the Pareto front of the cells drawn and ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for r in rows:
        if _finite(r[x_of_row]) and _finite(r["value"]):
            ax.scatter(r[x_of_row], r["value"], s=10, alpha=0.35, color=colours.get(r["cell"]))
    shown = [c for c in cells if _finite(getattr(c, x_of_cell)) and _finite(c.mean)]
    for c in shown:
        x = getattr(c, x_of_cell)
        yerr = [[c.mean - c.ci_low], [c.ci_high - c.mean]] if _finite(c.ci_low) else None
        ax.errorbar(
            x,
            c.mean,
            yerr=yerr,
            fmt="o",
            color=colours.get(c.label),
            capsize=3,
            label=_short(c.label),
        )
    points = [(getattr(c, x_of_cell), c.mean) for c in shown]
    front = pareto_front(points, maximize_x=maximize_x, maximize_y=mode == "max")
    if front:
        fx = [points[i][0] for i in front]
        fy = [points[i][1] for i in front]
        # The best value reachable within an x: held from a front point to the next (a cost),
        # or reached back from the next (a speed).
        ax.step(
            fx,
            fy,
            where="pre" if maximize_x else "post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", linewidths=1.5)
    xs = [x for x, _ in points]
    if log_x and xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{value_kind} {metric}")
    ax.set_title(
        f"{value_kind} {metric} vs {x_label} (cells: mean ± 95% CI; front ringed)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def rc_layers(
    cells: Sequence[CellSummary], *, colours: Mapping[str, Any], source: str, path: Path
) -> Path:
    """Rc (the compression term) per layer, one line per cell (the mean over its trials)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in cells:
        if not c.rc:
            continue
        layers = sorted(c.rc)
        ax.plot(
            layers,
            [c.rc[i] for i in layers],
            marker="o",
            color=colours.get(c.label),
            label=_short(c.label),
        )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("Rc (compression term)")
    ax.set_title(f"rc/layer_XX per cell ({source})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def learning_curves(
    rows: Sequence[Mapping[str, Any]],
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    metric: str,
    colours: Mapping[str, Any],
    path: Path,
    budget: int | None = None,
) -> Path:
    """The study metric and the training loss against the epoch, one line per trial coloured
    by cell; failed trials dashed, running ones dotted; the `budget` (the epoch the trials are
    compared at) a grey vertical line."""
    plt = _plt()
    keys = [metric, "train/loss"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seen: set[str] = set()
    for r in rows:
        style = {"FAILED": "--", "KILLED": "--", "RUNNING": ":"}.get(r["status"], "-")
        for ax, key in zip(axes, keys, strict=True):
            points = histories.get(r["run_id"], {}).get(key, [])
            if not points:
                continue
            label = _short(r["cell"]) if r["cell"] not in seen and key == metric else None
            if label is not None:
                seen.add(r["cell"])
            ax.plot(
                [s for s, _ in points],
                [v for _, v in points],
                linestyle=style,
                marker="." if len(points) < 3 else None,
                color=colours.get(r["cell"]),
                alpha=0.8,
                label=label,
            )
    for ax, key in zip(axes, keys, strict=True):
        if budget is not None:
            ax.axvline(budget, color="grey", linewidth=1, alpha=0.7)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.set_title(f"{key} per trial")
        ax.grid(alpha=0.3)
    if seen:
        axes[0].legend(fontsize=7)
    at = f"; grey line: the budget, epoch {budget}" if budget is not None else ""
    fig.suptitle(f"learning curves (dashed: failed, dotted: running{at})", fontsize=10)
    return _save(fig, path)


def image_grid(
    images: Sequence[tuple[str, str, Path]], *, title: str, path: Path, max_rows: int = 8
) -> Path:
    """A grid of PNGs: rows by their first label (a cell), columns by the second (a layer)."""
    from PIL import Image

    plt = _plt()
    row_labels = list(dict.fromkeys(r for r, _, _ in images))[:max_rows]
    col_labels = sorted({c for r, c, _ in images if r in row_labels})
    first = Image.open(images[0][2])
    aspect = first.height / max(1, first.width)
    width = 3.6
    fig, axes = plt.subplots(
        len(row_labels),
        len(col_labels),
        figsize=(width * len(col_labels), width * aspect * len(row_labels) + 0.8),
        squeeze=False,
    )
    lookup = {(r, c): p for r, c, p in images}
    for i, row in enumerate(row_labels):
        for j, col in enumerate(col_labels):
            ax = axes[i][j]
            ax.axis("off")
            if (row, col) in lookup:
                with Image.open(lookup[row, col]) as picture:
                    ax.imshow(picture.convert("RGB"))
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.text(
                    -0.02,
                    0.5,
                    _short(row),
                    transform=ax.transAxes,
                    rotation=90,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _optuna_axes(ax: Any) -> Any:
    """The figure of the axes an Optuna plot returned, sized for the page."""
    fig = ax.figure
    fig.set_size_inches(7.5, 4.6)
    ax.title.set_fontsize(10)
    return fig


def optuna_figures() -> Any:
    """`optuna.visualization.matplotlib` (the Agg backend set first)."""
    import optuna.visualization.matplotlib as plots

    _plt()
    return plots


@contextlib.contextmanager
def optuna_style() -> Iterator[None]:
    """Optuna's plots set matplotlib's style for the whole process (ggplot): kept to them; and
    no warnings that they are experimental."""
    with _plt().rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def optimisation_history(study: Any, *, target_name: str, path: Path) -> Path:
    """Optuna's optimisation-history plot of `study`: each complete trial's value by trial
    number and the best so far."""
    with optuna_style():
        ax = optuna_figures().plot_optimization_history(study, target_name=target_name)
        return _save(_optuna_axes(ax), path)


def param_importances(
    study: Any, *, params: Sequence[str], target_name: str, path: Path
) -> tuple[Path, list[str]]:
    """Optuna's parameter-importance plot of `params` over the complete trials (fANOVA, seed
    0), and the warnings Optuna gave (too few trials, ...)."""
    from optuna.importance import FanovaImportanceEvaluator

    with optuna_style(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ax = optuna_figures().plot_param_importances(
            study,
            evaluator=FanovaImportanceEvaluator(seed=0),
            params=list(params),
            target_name=target_name,
        )
        path = _save(_optuna_axes(ax), path)
    said = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, (ExperimentalWarning, DeprecationWarning))
    ]
    return path, list(dict.fromkeys(said))


def parallel_coordinate(study: Any, *, target_name: str, path: Path) -> Path:
    """Optuna's parallel-coordinate plot: every complete trial as a line through its
    parameters' values to its value."""
    with optuna_style():
        ax = optuna_figures().plot_parallel_coordinate(study, target_name=target_name)
        return _save(_optuna_axes(ax), path)
