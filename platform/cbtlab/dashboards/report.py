"""A study's report: its trial table as Parquet, its figures as PNG and one self-contained HTML
page, all logged under `report/` on the study's parent run so that the MLflow UI shows them.

    build_report(tracking_uri, study="rep_count_ablation")       # the latest invocation
    build_report(tracking_uri, parent_run_id="3f2a...")          # one invocation

The value plotted, averaged and tabled is each trial's metric at the study's budget, the epoch
every finished trial reached (`cbtlab.dashboards.runs`, `cbtlab.tune.budget`), and the page
says which epoch; the driver's answer (answer.txt on the parent run) heads the page.

Files (those whose data is missing are skipped, and the notes say why):
  trials.parquet                one row per trial run (`cbtlab.dashboards.runs.TABLE_COLUMNS`)
  metric_vs_<factor>.png        the value against each searched factor, 95% CI bands over seeds
  variants.png                  a bar per cell (variant) with its 95% CI and its seeds
  pareto_flops.png              the value against forward FLOPs per image, Pareto front marked
  pareto_throughput.png         the value against training images/s, Pareto front marked
  rc_layers.png                 rc/layer_XX per cell (probe runs, else the trials' own)
  learning_curves.png           the metric and train/loss per epoch, a line per trial
  attention_maps.png            the probe runs' attention_layer_XX.png, a row per cell
  optimisation_history.png      Optuna's plot of the values by trial and the best so far
  param_importances.png         Optuna's plot of the searched parameters' fANOVA importances
  parallel_coordinate.png       Optuna's parallel-coordinate plot (two or more parameters)
The last three are drawn by `optuna.visualization.matplotlib` from the search's stored Optuna
study (its values at the budget), or for a grid from one rebuilt from the runs
(`cbtlab.dashboards.search`).
  study_report.html             all of the above embedded (base64), the notes, the tables
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cbtlab.dashboards import figures as fig
from cbtlab.dashboards.runs import (
    CellSummary,
    Comparison,
    cell_summaries,
    check_against_stats,
    comparison,
    study_notes,
    trial_rows,
    trial_table,
)
from cbtlab.dashboards.search import (
    EVALUATOR,
    at_budget,
    complete_values,
    importance_params,
    rebuild_study,
    storage_of,
    stored_study,
)
from cbtlab.paths import cbtlab_home, default_tracking_uri, redact_url
from cbtlab.tracking.schema import ANSWER_TEXT, GIT_COMMIT_TAG, StudyRuns, load_study

REPORT_DIR = "report"
TABLE_FILE = "trials.parquet"
HTML_FILE = "study_report.html"
MAX_ATTENTION_ROWS = 8
FLOPS_SOURCES = {
    frozenset({"config"}): "counted from each run's config by cbtlab.analysis.count_flops",
    frozenset({"logged"}): "as the runs logged them",
    frozenset({"config", "logged"}): "as logged, else counted from the run's config",
    frozenset({"decoder"}): "the decoder's share, as the segmentation runs logged it",
}
RC_SOURCES = {frozenset({"probe"}): "probe runs", frozenset({"training"}): "training runs"}


@dataclass
class StudyReport:
    runs: StudyRuns
    table: pa.Table
    out_dir: Path
    table_path: Path
    html_path: Path
    figures: dict[str, Path]  # file name -> local path, in drawing order
    captions: dict[str, str]
    notes: list[str]
    cells: list[CellSummary]
    compare: Comparison  # the budget the values are at, the trials left out
    stats_checked: bool = False  # the cells agree with the study's stats.parquet
    answer: str = ""  # the driver's answer.txt on the parent run, when it logged one
    logged: bool = False
    artifacts: list[str] = field(default_factory=list)  # artifact paths on the parent run

    def add(self, name: str, path: Path, caption: str) -> None:
        """Keep a drawn figure (in drawing order, which is the page's order) and its caption."""
        self.figures[name] = path
        self.captions[name] = caption

    @property
    def files(self) -> list[Path]:
        return [self.table_path, *self.figures.values(), self.html_path]

    def ui_path(self) -> str:
        """The report's page in the MLflow UI, after its address."""
        return (
            f"#/experiments/{self.runs.experiment_id}/runs/{self.runs.parent_run_id}"
            f"/artifacts/{REPORT_DIR}/{HTML_FILE}"
        )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """No tqdm bar per downloaded artifact (MLflow reads the variable at each download)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def default_out_dir(runs: StudyRuns) -> Path:
    return cbtlab_home() / "reports" / f"{slug(runs.name)}-{runs.parent_run_id[:8]}"


def build_report(
    tracking_uri: str,
    study: str | None = None,
    parent_run_id: str | None = None,
    *,
    out_dir: Path | None = None,
    log: bool = True,
) -> StudyReport:
    """Read the study from MLflow, write its table, figures and HTML page to `out_dir`
    (default `<CBTLAB_HOME>/reports/<study>-<run id>`) and, with `log`, upload them under
    `report/` on the study's parent run."""
    runs = load_study(tracking_uri, study, parent_run_id)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)

    rows = trial_rows(runs)
    table = trial_table(runs, rows)
    table_path = out_dir / TABLE_FILE
    pq.write_table(table, table_path)
    notes = study_notes(runs, rows)
    cells = cell_summaries(rows)
    compare = comparison(runs, rows)
    colours = fig.cell_colours([c.label for c in cells])
    with quiet_downloads():
        stats_checked, stats_text = _check_stats(client, runs, compare, cells, notes)
        report = StudyReport(
            runs,
            table,
            out_dir,
            table_path,
            out_dir / HTML_FILE,
            {},
            {},
            notes,
            cells,
            compare,
            stats_checked,
            answer=_answer_text(client, runs),
        )
        _draw(report, rows, colours, client)
    report.html_path.write_text(render_html(report, stats_text))
    if log:
        for path in report.files:
            client.log_artifact(runs.parent_run_id, str(path), REPORT_DIR)
            report.artifacts.append(f"{REPORT_DIR}/{path.name}")
        report.logged = True
    return report


def _answer_text(client: MlflowClient, runs: StudyRuns) -> str:
    """The driver's answer.txt on the parent run ("" when it logged none: an older study, or
    one still running)."""
    if ANSWER_TEXT not in runs.artifacts:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(runs.parent_run_id, ANSWER_TEXT, tmp)).read_text()


# stats.parquet's metadata `metric`: "final val/top1 at epoch 8" ("final val/top1" before
# studies compared at a budget).
STATS_METRIC = re.compile(r"^(?P<what>.*?)(?: at epoch (?P<epoch>\d+|None))?$")


def _check_stats(
    client: MlflowClient,
    runs: StudyRuns,
    compare: Comparison,
    cells: Sequence[CellSummary],
    notes: list[str],
) -> tuple[bool, str]:
    """Compare the cells with the parent's stats.parquet when there is one: its metric (and
    budget, when it names one) against this report's, then n, mean and interval per cell;
    (agree, stats.txt)."""
    if "stats.parquet" not in runs.artifacts:
        return False, ""
    with tempfile.TemporaryDirectory() as tmp:
        stats = pq.read_table(client.download_artifacts(runs.parent_run_id, "stats.parquet", tmp))
        text = ""
        if "stats.txt" in runs.artifacts:
            text = Path(client.download_artifacts(runs.parent_run_id, "stats.txt", tmp)).read_text()
    meta = {k.decode(): v.decode() for k, v in (stats.schema.metadata or {}).items()}
    theirs = meta.get("metric", "")
    match = STATS_METRIC.match(theirs)
    what, epoch = match.group("what"), match.group("epoch")
    if theirs and what != f"{compare.kind} {compare.metric}":
        notes.append(f"stats.parquet is on {theirs!r}, this report on {compare.label!r}")
        return False, text
    if epoch is not None and epoch != str(compare.budget):
        notes.append(
            f"stats.parquet is at epoch {epoch}, this report at epoch {compare.budget} (trials "
            "changed after it was written): the cells are not checked against it"
        )
        return False, text
    problems = check_against_stats(cells, stats)
    if problems:
        notes.append(
            "the runs differ from stats.parquet (a study still running, or runs changed "
            "after it was written): " + "; ".join(problems[:5])
        )
    return not problems, text


def _draw(
    report: StudyReport, rows: list[dict[str, Any]], colours: dict[str, Any], client: MlflowClient
) -> None:
    """Draw every figure the study's data allows, in the page's order."""
    if any(math.isfinite(c.mean) for c in report.cells):
        _draw_values(report, rows, colours)
        _draw_paretos(report, rows, colours)
    _draw_layers_and_curves(report, rows, colours)
    _draw_attention(report, rows, client)
    _draw_search(report, rows)


def _what(compare: Comparison) -> tuple[str, str, str]:
    """(kind, metric with its budget, both) as the figures and captions name the value:
    ("final", "val/top1 at epoch 6", "final val/top1 at epoch 6")."""
    return compare.kind, compare.metric_at, compare.label


def _draw_values(report: StudyReport, rows: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    """The value against each factor, and per cell."""
    runs, cells, out = report.runs, report.cells, report.out_dir
    kind, metric, what = _what(report.compare)
    for factor in runs.factors:
        name = f"metric_vs_{slug(factor)}.png"
        report.add(
            name,
            fig.metric_vs_factor(
                rows, cells, factor, metric=metric, value_kind=kind, path=out / name
            ),
            f"{what} against {factor}: the line is the mean over seeds, the band its 95% "
            "t-interval (cells with two or more seeds), the dots single trials"
            + ("; hollow dots were stopped early by ASHA" if not runs.grid else ""),
        )
    report.add(
        "variants.png",
        fig.cell_bars(
            cells,
            metric=metric,
            value_kind=kind,
            baseline=runs.baseline,
            colours=colours,
            path=out / "variants.png",
        ),
        f"{what} per cell: mean, 95% t-interval over seeds and the seeds themselves"
        + (f"; baseline {runs.baseline} hatched" if runs.baseline else ""),
    )


def _draw_paretos(report: StudyReport, rows: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    """The value against FLOPs and against throughput, where the cells have them."""
    runs, cells, out = report.runs, report.cells, report.out_dir
    kind, metric, what = _what(report.compare)
    if any(math.isfinite(c.flops) and math.isfinite(c.mean) for c in cells):
        source = {r["flops_source"] for r in rows if r["flops_source"]}
        flops_of = "decoder FLOPs" if source == {"decoder"} else "forward FLOPs"
        report.add(
            "pareto_flops.png",
            fig.pareto(
                rows,
                cells,
                x_of_row="flops",
                x_of_cell="flops",
                x_label=f"{flops_of} per image",
                maximize_x=False,
                metric=metric,
                value_kind=kind,
                mode=runs.mode,
                colours=colours,
                path=out / "pareto_flops.png",
                log_x=True,
            ),
            f"{what} against {flops_of} per image ({FLOPS_SOURCES.get(frozenset(source))}); "
            "the Pareto front of the cells' means is dashed and ringed",
        )
    if any(math.isfinite(c.throughput) and math.isfinite(c.mean) for c in cells):
        report.add(
            "pareto_throughput.png",
            fig.pareto(
                rows,
                cells,
                x_of_row="throughput_img_s",
                x_of_cell="throughput",
                x_label="training images/s",
                maximize_x=True,
                metric=metric,
                value_kind=kind,
                mode=runs.mode,
                colours=colours,
                path=out / "pareto_throughput.png",
            ),
            f"{what} against training throughput (throughput/train_img_s, mean over "
            "epochs; measured on the machine each trial ran on); Pareto front dashed and "
            "ringed",
        )


def _draw_layers_and_curves(
    report: StudyReport, rows: list[dict[str, Any]], colours: dict[str, Any]
) -> None:
    """Rc per layer and the learning curves, where logged."""
    runs, cells, out, metric = report.runs, report.cells, report.out_dir, report.runs.metric
    if any(c.rc for c in cells):
        sources = {r["rc_source"] for r in rows if r["rc_source"]}
        source = RC_SOURCES.get(frozenset(sources), "probe runs where present, else training runs")
        report.add(
            "rc_layers.png",
            fig.rc_layers(cells, colours=colours, source=source, path=out / "rc_layers.png"),
            f"the compression term Rc of each layer's output (rc/layer_XX, from the {source}), "
            "mean over each cell's trials",
        )
    if any(runs.histories.get(r["run_id"], {}).get(metric) for r in rows):
        report.add(
            "learning_curves.png",
            fig.learning_curves(
                rows,
                runs.histories,
                metric=metric,
                colours=colours,
                path=out / "learning_curves.png",
                budget=report.compare.budget,
            ),
            f"{metric} and train/loss per epoch, one line per trial, coloured by cell"
            + (
                f"; the grey line is the budget, epoch {report.compare.budget}, where the "
                "trials are compared"
                if report.compare.budget is not None
                else ""
            ),
        )


def _draw_attention(report: StudyReport, rows: list[dict[str, Any]], client: MlflowClient) -> None:
    """The probe runs' attention maps, one trial per cell."""
    out = report.out_dir
    maps, sources = _attention_maps(client, rows, out / "_probes")
    if maps:
        report.add(
            "attention_maps.png",
            fig.image_grid(
                maps,
                title="CLS attention maps from the probe runs (one trial per cell)",
                path=out / "attention_maps.png",
                max_rows=MAX_ATTENTION_ROWS,
            ),
            "attention_layer_XX.png of the latest probe run of one trial per cell (rows), by "
            "layer (columns); each panel: images, per-head overlays, mean over heads. "
            "Sources: " + "; ".join(sources),
        )


def _search_study(report: StudyReport, rows: list[dict[str, Any]]) -> tuple[Any, str]:
    """The Optuna study the search figures are drawn from, and where it came from: a search's
    stored study (its values at the budget, `cbtlab.dashboards.search.at_budget`), else one
    rebuilt from the runs (a grid, or a storage that cannot be read: the notes say why)."""
    runs, compare = report.runs, report.compare
    found = storage_of(runs.parent.data.params)
    if found is not None:
        storage, name = found
        try:
            stored = stored_study(storage, name)
        except Exception as exc:  # a file moved, a database down or without the password
            report.notes.append(
                f"the search's Optuna study {name!r} in {redact_url(storage)} cannot be read "
                f"({type(exc).__name__}: {exc}); its figures are drawn from a study rebuilt "
                "from the MLflow runs"
            )
        else:
            budget = compare.budget if compare.equal else None
            view = at_budget(stored, budget=budget, kind=compare.kind, mode=runs.mode)
            return view, f"the search's stored Optuna study {name!r} ({redact_url(storage)})"
    study = rebuild_study(rows, runs.factors, runs.histories, metric=runs.metric, mode=runs.mode)
    return study, "an Optuna study rebuilt in memory from the MLflow trial runs"


def _draw_search(report: StudyReport, rows: list[dict[str, Any]]) -> None:
    """Optuna's own figures of the search (`optuna.visualization.matplotlib`): the
    optimisation history, the parameter importances and, for two or more parameters, the
    parallel coordinates."""
    out = report.out_dir
    _, _, what = _what(report.compare)
    study, source = _search_study(report, rows)
    values = complete_values(study)
    if not values:
        report.notes.append("no complete trial with a value: no optimisation history")
        return
    target = what if report.compare.budget is not None else f"{what} (Optuna's stored values)"
    report.add(
        "optimisation_history.png",
        fig.optimisation_history(study, target_name=target, path=out / "optimisation_history.png"),
        f"each trial's {target} by Optuna trial number, and the best so far; drawn by "
        f"optuna.visualization.matplotlib from {source}",
    )
    params, reason = importance_params(study)
    if not params:
        report.notes.append(f"no parameter importances: {reason}")
        return
    try:
        path, said = fig.param_importances(
            study, params=params, target_name=target, path=out / "param_importances.png"
        )
    except (ValueError, RuntimeError) as exc:
        report.notes.append(f"no parameter importances: Optuna could not compute them: {exc}")
        return
    report.notes.extend(f"parameter importances: {line}" for line in said)
    report.add(
        "param_importances.png",
        path,
        f"importance of each searched parameter for {target} ({EVALUATOR}, over the complete "
        f"trials of {source})"
        + ("; with one parameter its importance is 1 by definition" if len(params) == 1 else ""),
    )
    if len(params) > 1:
        try:
            path = fig.parallel_coordinate(
                study, target_name=target, path=out / "parallel_coordinate.png"
            )
        except (ValueError, RuntimeError) as exc:
            report.notes.append(f"no parallel coordinates: Optuna could not draw them: {exc}")
            return
        report.add(
            "parallel_coordinate.png",
            path,
            f"every complete trial of {source} as a line through its parameters to its {target}",
        )


def _attention_maps(
    client: MlflowClient, rows: Sequence[dict[str, Any]], into: Path
) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """(cell, layer, local PNG) of the attention maps of one probed trial per cell, and the
    trial and probe run each row came from."""
    out: list[tuple[str, str, Path]] = []
    sources: list[str] = []
    done: set[str] = set()
    for r in rows:
        probe = r["probe_run_id"]
        if not probe or r["cell"] in done or len(done) >= MAX_ATTENTION_ROWS:
            continue
        names = [
            a.path
            for a in client.list_artifacts(probe, "probes")
            if re.search(r"attention_layer_\d+\.png$", a.path)
        ]
        if not names:
            continue
        done.add(r["cell"])
        sources.append(f"{r['cell']}: trial {r['trial']}, probe run {probe}")
        folder = into / probe
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            local = Path(client.download_artifacts(probe, name, str(folder)))
            layer = int(re.search(r"attention_layer_(\d+)", name).group(1))
            out.append((r["cell"], f"layer {layer}", local))
    return out, sources


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.FAILED td, tr.KILLED td { color: #a00; } tr.RUNNING td { color: #555; font-style: italic; }
.notes li { margin: 0.2em 0; } .ok { color: #070; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; max-width: 900px; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _si(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _table(
    headers: Sequence[str], body: Sequence[Sequence[str]], classes: Sequence[str] = ()
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    head = f"<tr>{head}</tr>" if headers else ""
    lines = []
    for i, row in enumerate(body):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>'
            if re.fullmatch(r"[-+0-9.e ]+[GMk]?", c)
            else f"<td>{html.escape(c)}</td>"
            for c in row
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>{head}{''.join(lines)}</table>"


def render_html(report: StudyReport, stats_text: str = "") -> str:
    """The report as one self-contained HTML page (images embedded as base64 PNG)."""
    runs, e = report.runs, html.escape
    parent = runs.parent
    params = parent.data.params
    statuses: dict[str, int] = {}
    for s in report.table.column("status").to_pylist():
        statuses[s] = statuses.get(s, 0) + 1
    meta = [
        ("study", runs.name),
        ("experiment", f"{runs.experiment_name} (id {runs.experiment_id})"),
        ("parent run", f"{parent.info.run_id} ({parent.info.status})"),
        ("tracking URI", runs.tracking_uri),
        ("metric", f"{runs.metric} ({runs.mode}); compared value: {_budget_line(report.compare)}"),
        (
            "searcher / scheduler",
            f"{params.get('study.searcher', '?')} / {params.get('study.scheduler', '?')}",
        ),
        ("factors", ", ".join(runs.factors) or "-"),
        ("seeds per cell", params.get("study.seeds", "?")),
        ("trials", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"),
        ("git commit", parent.data.tags.get(GIT_COMMIT_TAG, "?")),
        ("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    if runs.baseline:
        meta.insert(7, ("baseline", runs.baseline))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(runs.name)}: study report</title><style>{CSS}</style></head><body>",
        f"<h1>Study report: {e(runs.name)}</h1>",
        _table([], [[k, v] for k, v in meta]),
    ]
    if report.answer:
        parts.append(f"<h2>Answer (the study's {e(ANSWER_TEXT)})</h2><pre>{e(report.answer)}</pre>")
    parts.append("<h2>Notes</h2>")
    if report.notes:
        parts.append(
            "<ul class='notes'>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>"
        )
    else:
        parts.append("<p class='ok'>Nothing missing: every trial finished with every metric.</p>")
    if report.stats_checked:
        parts.append(
            "<p class='ok'>The cells' n, means and intervals below equal the study's "
            "stats.parquet.</p>"
        )
    if report.cells:
        parts.append(f"<h2>Cells ({e(report.compare.label)}, 95% t-interval)</h2>")
        body = [
            [
                c.label,
                str(c.n),
                _num(c.mean),
                "-" if not math.isfinite(c.ci_low) else f"[{c.ci_low:.4f}, {c.ci_high:.4f}]",
                _si(c.flops),
                _num(c.throughput, 1),
            ]
            for c in report.cells
        ]
        parts.append(_table(["cell", "n", "mean", "95% CI", "FLOPs", "train img/s"], body))
    parts.append("<h2>Figures</h2>")
    if not report.figures:
        parts.append("<p>No figures: no trial has data to draw yet (see the notes).</p>")
    for name, path in report.figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f"<figure id='{e(name)}'><img alt='{e(name)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{e(name)}</b>: {e(report.captions[name])}</figcaption></figure>"
        )
    parts.append(f"<h2>Trials ({e(TABLE_FILE)}: {report.table.num_rows} rows)</h2>")
    parts.append(_trials_html(report.table, report.compare))
    if stats_text:
        parts.append(f"<h2>Statistics (stats.txt)</h2><pre>{e(stats_text)}</pre>")
    columns = ", ".join(report.table.column_names)
    parts.append(f"<p style='font-size:0.8em'>{e(TABLE_FILE)} columns: {e(columns)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _budget_line(compare: Comparison) -> str:
    """The metric line's account of the value the report compares."""
    if not compare.equal:
        return (
            f"{compare.label} (a search logged before studies compared at one budget: the "
            "values may be at unequal budgets)"
        )
    if compare.budget is None:
        return compare.label
    return (
        f"{compare.label}, the largest epoch every finished trial reached "
        f"({len(compare.compared)} trials compared, {len(compare.left_out)} left out); a "
        "trial's own final and best, over all its epochs, are shown beside, never compared"
    )


def _trials_html(table: pa.Table, compare: Comparison) -> str:
    """The trials table: each trial's value at the budget beside its own final and best."""
    value = (
        f"{compare.kind} @ epoch {compare.budget}"
        if compare.budget is not None
        else f"{compare.kind} (own epochs)"
        if not compare.equal
        else "value (no budget)"
    )
    headers = [
        "trial",
        "status",
        "cell",
        "seed",
        "epochs",
        "own final",
        "own best",
        value,
        "FLOPs",
        "img/s",
        "time (s)",
        "run id",
    ]
    body, classes = [], []
    for r in table.to_pylist():
        status = "STOPPED (ASHA)" if r["stopped_early"] else r["status"]
        body.append(
            [
                r["trial"],
                status,
                r["cell"],
                _num(r["seed"]),
                _num(r["epochs"]),
                _num(r["final"]),
                _num(r["best"]),
                _num(r["value"]),
                _si(math.nan if r["flops"] is None else r["flops"]),
                _num(r["throughput_img_s"], 1),
                _num(r["seconds"], 1),
                r["run_id"],
            ]
        )
        classes.append(r["status"])
    return _table(headers, body, classes)


# ---------------------------------------------------------------------------------------------
# Command line


def report_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line of `dashboards/study_report.py`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build a study's report (Parquet table, PNG figures, one HTML page) from "
        "MLflow and log it under report/ on the study's parent run.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="the study's name (its latest invocation)")
    which.add_argument("--parent", help="the study's parent run id")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI or the SQLite store under CBTLAB_HOME)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="local folder for the files (default: <CBTLAB_HOME>/reports/<study>-<run id>)",
    )
    parser.add_argument(
        "--no-log", action="store_true", help="write the files only; log nothing to MLflow"
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        report = build_report(uri, args.study, args.parent, out_dir=args.out, log=not args.no_log)
    except (LookupError, ValueError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    runs = report.runs
    print(
        f"study {runs.name!r}: parent run {runs.parent_run_id} ({runs.parent.info.status}), "
        f"{report.table.num_rows} trial runs, in {uri}"
    )
    print(f"value:   {report.compare.label}")
    print("notes:" if report.notes else "notes: none, every trial finished with every metric")
    for note in report.notes:
        print(f"  - {note}")
    print(f"table:   {report.table_path} ({', '.join(report.table.column_names)})")
    for path in report.figures.values():
        print(f"figure:  {path}")
    print(f"report:  {report.html_path}")
    if report.logged:
        print(
            f"logged under {REPORT_DIR}/ on run {runs.parent_run_id}; in the MLflow UI "
            f"(python dashboards/serve.py): {report.ui_path()}"
        )
    return 0
