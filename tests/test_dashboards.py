"""Study reports built from MLflow: the trial table against the runs, every figure a valid PNG
logged on the parent run, partial data noted rather than fatal (no Ray: the study's own MLflow
writers fed with stand-in trials, see synthetic_study.py), and one tiny real study on Ray."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from cbtlab.dashboards.figures import level_order, pareto_front
from cbtlab.dashboards.report import (
    HTML_FILE,
    REPORT_DIR,
    STATS_METRIC,
    TABLE_FILE,
    build_report,
    report_main,
)
from cbtlab.dashboards.runs import TABLE_COLUMNS, study_notes, trial_rows
from cbtlab.dashboards.search import complete_values
from cbtlab.dashboards.serve import artifact_root, mlflow_command, optuna_storage, serve_main
from cbtlab.tables import format_table
from cbtlab.tracking.schema import load_study, study_from_mlflow
from cbtlab.tune.budget import common_budget, with_budget_values
from cbtlab.tune.stats import cell_label
from conftest import FinishedStudy
from synthetic_study import Outcome, value_of, write_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert path.stat().st_size >= min_bytes, (path, path.stat().st_size)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= 300 and image.height >= 150, (path, image.size)


def assert_report_files(report, client: MlflowClient) -> None:
    """Every figure a valid PNG; the table, figures and HTML page logged under report/."""
    assert report.figures, "no figure drawn"
    for path in report.figures.values():
        assert_valid_png(path)
    logged = {a.path for a in client.list_artifacts(report.runs.parent_run_id, REPORT_DIR)}
    expected = {f"{REPORT_DIR}/{name}" for name in (TABLE_FILE, HTML_FILE, *report.figures)}
    assert logged == expected
    page = report.html_path.read_text()
    assert page.count("data:image/png;base64,") == len(report.figures)
    assert "<h2>Notes</h2>" in page and "http" not in page.split("<body>")[1].split("<h2>")[0]


OPTUNA_PLOTS = {
    "optimisation_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
}


def spy_on_optuna_plots(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Optuna's plot functions, each recording the studies it drew."""
    import optuna.visualization.matplotlib as plots

    drawn: dict[str, list] = {}

    def spy_on(name: str) -> None:
        real = getattr(plots, name)

        def spy(study, *args, **kwargs):
            drawn.setdefault(name, []).append(study)
            return real(study, *args, **kwargs)

        monkeypatch.setattr(plots, name, spy)

    for name in OPTUNA_PLOTS.values():
        spy_on(name)
    return drawn


def check_table_against_runs(report, client: MlflowClient, metric: str = "val/top1") -> None:
    """One row per trial run, each value as the run holds it."""
    runs = report.runs
    table = pq.read_table(report.table_path)
    assert table.schema.metadata[b"parent_run_id"].decode() == runs.parent_run_id
    children = client.search_runs(
        [runs.experiment_id], f"tags.`mlflow.parentRunId` = '{runs.parent_run_id}'"
    )
    assert sorted(table.column("run_id").to_pylist()) == sorted(c.info.run_id for c in children)
    names = table.column_names
    assert (
        names[: names.index("cell") + 1]
        == list(TABLE_COLUMNS)[: list(TABLE_COLUMNS).index("cell") + 1]
    )
    assert set(TABLE_COLUMNS) | set(runs.factors) <= set(names)
    rows = {r["run_id"]: r for r in table.to_pylist()}
    for child in children:
        row = rows[child.info.run_id]
        params, metrics, tags = child.data.params, child.data.metrics, child.data.tags
        assert row["status"] == child.info.status
        assert row["trial"] == child.info.run_name
        assert row["seed"] == int(params["train.seed"])
        assert row["cell"] == tags["cbtlab.cell"]
        for factor in runs.factors:
            assert str(row[factor]) == params[factor]
        assert row["attention"] == params["model.attention"]
        if metric in metrics:
            assert row["final"] == metrics[metric] and row["val/top1"] == metrics[metric]
        else:
            assert math.isnan(row["final"])
        if f"best/{metric}" in metrics:
            assert row["best"] == metrics[f"best/{metric}"]
        speed = [
            m.value for m in client.get_metric_history(child.info.run_id, "throughput/train_img_s")
        ]
        if speed:
            assert row["throughput_img_s"] == pytest.approx(sum(speed) / len(speed))
        assert row["flops"] > 0 and row["flops_source"] == "config" and row["n_params"] > 0
    # Equal model configs (a cell's seeds) count equal FLOPs.
    flops: dict[str, set[float]] = {}
    for r in rows.values():
        flops.setdefault(r["cell"], set()).add(r["flops"])
    assert all(len(v) == 1 for v in flops.values())


def test_grid_report_matches_the_runs_and_lands_on_the_parent_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = spy_on_optuna_plots(monkeypatch)
    study = write_study(
        tmp_path,
        space={"model.attention": ["cbsa", "softmax", "mssa"]},
        seeds=2,
        outcomes={0: Outcome(rc=True), 3: Outcome(rc=True)},
    )
    client = MlflowClient(study.uri)
    report = build_report(study.uri, "synthetic", out_dir=tmp_path / "report")

    assert report.runs.parent_run_id == study.parent_run_id and report.table.num_rows == 6
    check_table_against_runs(report, client)
    assert report.stats_checked  # the cells' n, means and CIs equal stats.parquet's
    assert set(report.figures) == {
        "metric_vs_model_attention.png", "variants.png", "pareto_flops.png",
        "pareto_throughput.png", "rc_layers.png", "learning_curves.png", "attention_maps.png",
        "optimisation_history.png", "param_importances.png",
    }  # fmt: skip
    assert_report_files(report, client)
    rows = {r["run_id"]: r for r in report.table.to_pylist()}
    # rc/layer_XX: the probe run's where a trial has one, else the trial's own last values.
    for trial_run, probe_run in study.probe_run_ids.items():
        probe = client.get_run(probe_run).data.metrics
        assert rows[trial_run]["rc/layer_01"] == probe["rc/layer_01"]
        assert (
            rows[trial_run]["rc_source"] == "probe" and rows[trial_run]["probe_run_id"] == probe_run
        )
    trained = study.trials[3]["run_id"]
    assert trained not in study.probe_run_ids
    assert rows[trained]["rc_source"] == "training"
    assert rows[trained]["rc/layer_00"] == client.get_run(trained).data.metrics["rc/layer_00"]
    # Softmax attention costs more FLOPs than CBSA at this size (N = 64 tokens, m = 16).
    by_attention = {r["attention"]: r["flops"] for r in rows.values()}
    assert by_attention["softmax"] > by_attention["cbsa"]
    assert report.notes == []  # nothing missing: every trial finished, 2 seeds per cell
    # A grid has no Optuna study: Optuna drew one rebuilt from the runs, valued as the table.
    [history] = drawn["plot_optimization_history"]
    assert complete_values(history) == [r["value"] for r in report.table.to_pylist()]
    assert drawn["plot_param_importances"] == [history]
    assert (
        "rebuilt in memory from the MLflow trial runs"
        in report.captions["optimisation_history.png"]
    )


def test_partial_data_is_reported_not_fatal(tmp_path: Path) -> None:
    """A study still running, one seed, a failed trial, a trial without the metric, a running
    trial: every case is named in the notes; the figures that can be drawn are."""
    study = write_study(
        tmp_path,
        space={"model.attention": ["cbsa", "softmax", "mssa", "tssa"]},
        seeds=1,
        outcomes={1: Outcome(fail_after=1), 2: Outcome(drop_metric=True),
                  3: Outcome(running_after=2)},
        finish=False,
        probes=False,
    )  # fmt: skip
    client = MlflowClient(study.uri)
    assert client.get_run(study.parent_run_id).info.status == "RUNNING"
    report = build_report(study.uri, parent_run_id=study.parent_run_id, out_dir=tmp_path / "r")
    check_table_against_runs(report, client)
    rows = {r["run_id"]: r for r in report.table.to_pylist()}
    failed, no_metric, running = (study.trials[i]["run_id"] for i in (1, 2, 3))
    assert rows[failed]["status"] == "FAILED" and "synthetic failure" in rows[failed]["error"]
    assert math.isnan(rows[failed]["value"]) and math.isnan(rows[no_metric]["value"])
    assert rows[running]["status"] == "RUNNING" and rows[running]["epochs"] == 2
    assert math.isnan(rows[running]["value"]) and math.isnan(rows[running]["best/val/top1"])
    notes = "\n".join(report.notes)
    for expected in (
        "still running (parent run RUNNING)",
        "1 trial(s) FAILED",
        "RuntimeError: synthetic failure",
        "val/top1 is missing in 1 run(s)",
        "1 trial(s) still running",
        "no confidence bands",
        "no rc/layer_XX metrics",
        "no probe runs",
    ):
        assert expected in notes, expected
    assert "rc_layers.png" not in report.figures and "attention_maps.png" not in report.figures
    assert {"variants.png", "learning_curves.png", "optimisation_history.png"} <= set(
        report.figures
    )
    assert_report_files(report, client)
    assert "still running" in report.html_path.read_text()


def test_a_study_with_no_trial_yet(tmp_path: Path) -> None:
    from cbtlab.tracking import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "empty")
    parent = tracker.start_run(
        "empty",
        params={"study.space": '{"model.attention": ["cbsa"]}', "study.metric": "val/top1:max"},
        tags={"cbtlab.role": "study", "cbtlab.study": "empty"},
    )
    report = build_report(uri, "empty", out_dir=tmp_path / "r")
    assert report.runs.parent_run_id == parent and report.table.num_rows == 0
    assert report.figures == {}
    assert {"cell", "model.attention", "value"} <= set(
        pq.read_table(report.table_path).column_names
    )
    assert any("no trial runs yet" in n for n in report.notes)
    assert "still running" in report.html_path.read_text()


def _cell(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "train.seed"}


def test_values_and_cells_are_at_the_common_budget(tmp_path: Path) -> None:
    """A grid whose trials reached different epochs (one stopped after 2 of 3, one failed
    after 1): every value, cell mean and interval is the metric at epoch 2, the epoch every
    finished trial reached, as the driver's stats.parquet and answer have them; the failed
    trial is left out and named; the page says which budget everywhere."""
    study = write_study(
        tmp_path,
        space={"model.attention": ["cbsa", "softmax"]},
        seeds=2,
        outcomes={1: Outcome(stopped_after=2), 3: Outcome(fail_after=1)},
        probes=False,
    )
    report = build_report(study.uri, "synthetic", out_dir=tmp_path / "r", log=False)
    assert report.compare.budget == 2 and report.compare.label == "final val/top1 at epoch 2"
    rows = {r["run_id"]: r for r in report.table.to_pylist()}
    expected: dict[str, list[float]] = {}
    for i, t in enumerate(study.trials):
        row = rows[t["run_id"]]
        if i == 3:  # failed: no value, its own final kept
            assert math.isnan(row["value"]) and row["value_epoch"] is None
            assert row["final"] == pytest.approx(
                value_of(_cell(t["point"]), t["point"]["train.seed"], 1)
            )
            continue
        at_budget = value_of(_cell(t["point"]), t["point"]["train.seed"], 2)
        assert row["value"] == pytest.approx(at_budget) and row["value_epoch"] == 2
        own = value_of(_cell(t["point"]), t["point"]["train.seed"], row["epochs"])
        assert row["final"] == pytest.approx(own)  # its own last value, shown beside
        expected.setdefault(cell_label(_cell(t["point"])), []).append(at_budget)
    assert rows[study.trials[0]["run_id"]]["final"] != rows[study.trials[0]["run_id"]]["value"]
    means = {c.label: c.mean for c in report.cells}
    assert means == pytest.approx({k: sum(v) / len(v) for k, v in expected.items()})
    assert report.stats_checked  # stats.parquet is "final val/top1 at epoch 2" too
    meta = report.table.schema.metadata
    assert (meta[b"budget"], meta[b"value"], meta[b"equal_budget"]) == (b"2", b"final", b"true")
    notes = "\n".join(report.notes)
    failed = rows[study.trials[3]["run_id"]]["trial"]
    stopped = rows[study.trials[1]["run_id"]]["trial"]
    assert f"left out of the comparison at epoch 2, no value: {failed} (FAILED)" in notes
    assert "compared at epoch 2 like every trial" in notes and stopped in notes
    assert "2 trial(s) ran past epoch 2 (to 3)" in notes
    page = report.html_path.read_text()
    assert "best at epoch 2" in report.answer  # the driver's answer.txt, near the top
    assert page.index(html.escape(report.answer.strip())) < page.index("<h2>Notes</h2>")
    assert "compared value: final val/top1 at epoch 2, the largest epoch" in page
    assert "<h2>Cells (final val/top1 at epoch 2, 95% t-interval)</h2>" in page
    assert "<th>final @ epoch 2</th>" in page
    assert "variants.png</b>: final val/top1 at epoch 2 per cell" in page
    # The summary rows read back from MLflow carry their histories: ranked at the same budget.
    _, keys, metric, mode, summary = study_from_mlflow(study.uri, "synthetic")
    by_run = {r["run_id"]: r for r in summary}
    point = study.trials[1]["point"]
    assert by_run[study.trials[1]["run_id"]]["history"] == pytest.approx(
        {e: value_of(_cell(point), point["train.seed"], e) for e in (1, 2)}
    )
    assert common_budget(summary) == 2
    with_budget_values(summary, 2, "final", mode)
    for run_id, r in by_run.items():
        if run_id == study.trials[3]["run_id"]:
            assert r["at_budget"] is None
        else:
            assert r["at_budget"] == pytest.approx(rows[run_id]["value"])
    assert "val/top1 @ epoch 2" in format_table(summary, keys, metric, mode, 2)


def _asha_search(tmp_path: Path):
    """A search over two factors whose ASHA stopped trials after 1 and 2 of 3 epochs."""
    return write_study(
        tmp_path,
        name="search",
        space={"model.rep_grid": ["1x1", "2x2", "4x4"], "model.depth": [1, 2]},
        grid=False,
        seeds=1,
        outcomes={1: Outcome(stopped_after=1), 2: Outcome(stopped_after=2)},
        probes=False,
    )


def test_search_report_has_one_figure_per_factor_and_optuna_importances(tmp_path: Path) -> None:
    """A search whose ASHA stopped trials after 1 and 2 of 3 epochs: compared at epoch 1."""
    study = _asha_search(tmp_path)
    report = build_report(study.uri, "search", out_dir=tmp_path / "r")
    assert report.runs.value_kind == "final" and not report.runs.grid  # study.stats's
    assert {"metric_vs_model_rep_grid.png", "metric_vs_model_depth.png",
            "param_importances.png"} <= set(report.figures)  # fmt: skip
    assert report.table.schema.metadata[b"value"] == b"final"
    assert report.table.schema.metadata[b"budget"] == b"1"
    rows = {r["run_id"]: r for r in report.table.to_pylist()}
    for t in study.trials:
        assert rows[t["run_id"]]["value"] == pytest.approx(value_of(t["point"], 0, 1))
    assert "metric_vs_model_depth.png</b>: final val/top1 at epoch 1 against" in (
        report.html_path.read_text()
    )
    assert_report_files(report, MlflowClient(study.uri))


def test_search_figures_are_optunas_own_plots_of_the_stored_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search's figures are Optuna's plots of the study its searcher stored, valued at the
    budget (epoch 1: ASHA stopped two trials there and at 2), as the table is; a storage that
    cannot be read is said, and a study rebuilt from the runs drawn instead."""
    import optuna

    study = _asha_search(tmp_path)
    params = MlflowClient(study.uri).get_run(study.parent_run_id).data.params
    storage, name = params["study.optuna_storage"], params["study.optuna_study"]
    stored = optuna.load_study(study_name=name, storage=storage)
    drawn = spy_on_optuna_plots(monkeypatch)
    report = build_report(study.uri, "search", out_dir=tmp_path / "r")
    values = [r["value"] for r in report.table.to_pylist()]  # in start order: Optuna's order
    for figure, plot in OPTUNA_PLOTS.items():
        assert_valid_png(report.figures[figure])
        [seen] = drawn[plot]
        assert seen.study_name == name
        assert [(t.number, t.params) for t in seen.trials] == [
            (t.number, t.params) for t in stored.trials
        ]
        assert complete_values(seen) == values
        assert f"stored Optuna study {name!r}" in report.captions[figure]
    assert [t.value for t in stored.trials] != values  # Optuna stored each trial's last value
    assert_report_files(report, MlflowClient(study.uri))
    # Served by optuna-dashboard: the storage of that study's latest search, or the store's.
    assert optuna_storage(None, "search", study.uri) == (storage, name)
    assert optuna_storage(None, None, study.uri) == (storage, name)
    assert optuna_storage("sqlite:///x.db", "search", study.uri) == ("sqlite:///x.db", None)

    Path(storage.removeprefix("sqlite:///")).unlink()
    drawn.clear()
    again = build_report(study.uri, "search", out_dir=tmp_path / "r2", log=False)
    assert any(f"Optuna study {name!r}" in n and "cannot be read" in n for n in again.notes)
    [seen] = drawn["plot_optimization_history"]
    assert seen.study_name != name and complete_values(seen) == values


def test_a_search_logged_before_the_budget_keeps_its_best_and_says_so(tmp_path: Path) -> None:
    """No study.stats on the parent (the driver before budgets): each finished trial's best
    over its own epochs, and a note that those budgets may differ."""
    study = write_study(
        tmp_path,
        name="old",
        space={"model.rep_grid": ["1x1", "2x2"]},
        grid=False,
        seeds=1,
        outcomes={1: Outcome(stopped_after=1)},
        probes=False,
        legacy=True,
    )
    runs = load_study(study.uri, "old")
    assert runs.value_kind == "best"
    rows = trial_rows(runs)
    assert [r["value"] for r in rows] == [r["best"] for r in rows]
    assert [r["epochs"] for r in rows] == [3, 1, 3]
    notes = "\n".join(study_notes(runs, rows))
    assert "values may be at unequal budgets (they ran 1 to 3 epochs)" in notes


def test_a_segmenters_miou_and_pixel_accuracy_reach_the_table(tmp_path: Path) -> None:
    """A segmentation trial logs val/miou and val/pixel_acc (and their best/): the table has
    them as columns beside a classifier's top-1, so its runs.parquet is not all NaN."""
    study = write_study(tmp_path, seeds=1, probes=False)
    client = MlflowClient(study.uri)
    run_id = study.trials[0]["run_id"]
    logged = {"val/miou": 0.61, "val/pixel_acc": 0.83, "best/val/miou": 0.64,
              "best/val/pixel_acc": 0.85}  # fmt: skip
    for key, value in logged.items():
        client.log_metric(run_id, key, value, step=3)
    rows = {r["run_id"]: r for r in trial_rows(load_study(study.uri, "synthetic"))}
    assert {key: rows[run_id][key] for key in logged} == logged
    other = study.trials[1]["run_id"]
    assert all(math.isnan(rows[other][key]) for key in logged)
    assert set(logged) <= set(TABLE_COLUMNS)


def test_the_stats_metric_names_its_budget() -> None:
    cases = [
        ("final val/top1 at epoch 8", "final val/top1", "8"),
        ("best val/loss", "best val/loss", None),
        ("final val/top1 at epoch None", "final val/top1", "None"),
    ]
    for text, what, epoch in cases:
        match = STATS_METRIC.match(text)
        assert (match.group("what"), match.group("epoch")) == (what, epoch)


def test_report_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, seeds=1, probes=False)
    out = tmp_path / "cli"
    code = report_main(["--study", "synthetic", "--tracking-uri", study.uri, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"parent run {study.parent_run_id}" in printed and "no confidence bands" in printed
    assert (out / TABLE_FILE).is_file() and (out / HTML_FILE).is_file()
    assert f"{REPORT_DIR}/{HTML_FILE}" in printed
    assert report_main(["--study", "nope", "--tracking-uri", study.uri]) == 1
    assert "no study run named 'nope'" in capsys.readouterr().err
    # A study logged under another experiment name is found by its cbtlab.study tag.
    MlflowClient(study.uri).rename_experiment(study.experiment_id, "elsewhere")
    argv = ["--study", "synthetic", "--tracking-uri", study.uri, "--out", str(out), "--no-log"]
    assert report_main(argv) == 0
    assert "logged under" not in capsys.readouterr().out


def test_pareto_front_and_level_order() -> None:
    # (FLOPs, accuracy): fewer FLOPs and more accuracy are better.
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9), (4.0, 0.8)]
    assert pareto_front(points, maximize_x=False, maximize_y=True) == [0, 1, 3]
    # (images/s, accuracy): both higher is better.
    assert pareto_front(points, maximize_x=True, maximize_y=True) == [3]
    assert level_order(["8x8", "1x1", "4x2", "2x2"]) == (["1x1", "2x2", "4x2", "8x8"], False)
    assert level_order(["0.5", "-1", "1"]) == (["-1", "0.5", "1"], True)
    assert level_order(["cbsa", "mssa", "cbsa"]) == (["cbsa", "mssa"], False)


def test_serve_uses_the_stores_artifact_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = mlflow_command("sqlite:////data/x/mlflow.db", "127.0.0.1", 5001)
    assert command[command.index("--default-artifact-root") + 1] == "file:///data/x/mlartifacts"
    assert artifact_root("http://server:5000") is None
    # No Optuna storage: said plainly, nothing started.
    code = serve_main(
        ["--tracking-uri", "http://127.0.0.1:9", "--optuna", "--optuna-storage",
         "sqlite:////nonexistent/optuna.db"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "is a tracking server" in out and "no Optuna storage" in out
    # No search in the store: said, with the flag to give.
    with pytest.raises(LookupError, match="no Optuna search named 'grid'"):
        optuna_storage(None, "grid", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.ray
def test_report_of_a_tiny_real_study(tiny_variant_study: FinishedStudy, tmp_path: Path) -> None:
    """A real grid study (2 attentions x 3 seeds, 1 epoch, Rc logged by training), one trial
    probed, then its report: the table equals the runs, every figure is a valid PNG."""
    from cbtlab.analysis.interpretability import ProbeSettings, probe_run

    uri, name = tiny_variant_study.uri, tiny_variant_study.name
    assert tiny_variant_study.code == 0
    started = time.monotonic()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    parent = client.search_runs([experiment.experiment_id], "tags.`cbtlab.role` = 'study'")[0]
    trial = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )[0]
    settings = ProbeSettings(samples=16, robustness_images=32, overlay_images=2,
                             noise_scales=(0.0, 0.1))  # fmt: skip
    probe_run(uri, trial.info.run_id, settings=settings, out_dir=tmp_path / "probe")

    report = build_report(uri, name, out_dir=tmp_path / "report")
    assert report.table.num_rows == 6 and report.stats_checked
    check_table_against_runs(report, client)
    assert {"rc/layer_00", "model.attention"} <= set(report.table.column_names)
    assert {"variants.png", "pareto_flops.png", "pareto_throughput.png", "rc_layers.png",
            "learning_curves.png", "attention_maps.png"} <= set(report.figures)  # fmt: skip
    assert_report_files(report, client)
    print(f"probe and report: {time.monotonic() - started:.0f} s")
