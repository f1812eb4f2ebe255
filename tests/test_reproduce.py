"""Exact re-runs of logged trials (`cbtlab.tune.reproduce`), and one tiny grid study that also
checks a real MLflow tracking server and 4 trials at once: the comparison and warnings without
Ray, then the study and its reproduction on local Ray."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ExperimentConfig
from cbtlab.tracking import provenance_differences
from cbtlab.tracking.schema import REPRODUCED_TAG, REPRODUCES_TAG, run_params
from cbtlab.tune.reproduce import (
    compare_histories,
    format_diffs,
    rebuild_config,
    reproduce_main,
    seed_spread,
)
from cbtlab.tune.runner import run_study
from cbtlab.tune.spec import StudySpec

# --- without Ray ---------------------------------------------------------------------------


def test_histories_compare_epoch_by_epoch_within_the_tolerance() -> None:
    logged = {"val/top1": {1: 0.5, 2: 0.75}, "train/loss": {1: 2.0, 2: 1.0}}
    same = compare_histories(logged, {k: dict(v) for k, v in logged.items()})
    assert all(d.max_abs_diff == 0 and d.first_epoch is None for d in same)
    assert [(d.metric, d.epochs, d.logged, d.reproduced) for d in same] == [
        ("train/loss", 2, 1.0, 1.0), ("val/top1", 2, 0.75, 0.75)
    ]  # fmt: skip
    off = {"val/top1": {1: 0.5 + 1e-6, 2: 0.75}, "train/loss": {1: 2.0}}
    diffs = {d.metric: d for d in compare_histories(logged, off)}
    assert diffs["val/top1"].max_abs_diff == pytest.approx(1e-6)
    assert diffs["val/top1"].first_epoch == 1 and diffs["val/top1"].final_diff == 0
    # An epoch the re-run never reached is an infinite difference.
    assert math.isinf(diffs["train/loss"].max_abs_diff) and diffs["train/loss"].first_epoch == 2
    assert diffs["train/loss"].reproduced is None
    within = {d.metric: d for d in compare_histories(logged, off, tolerance=1e-5)}
    assert within["val/top1"].first_epoch is None
    table = format_diffs(list(diffs.values()))
    assert "max |diff| (all epochs)" in table and "inf" in table


def test_rebuilt_config_names_what_the_code_changed() -> None:
    cfg = ExperimentConfig().with_overrides({"model.depth": 3, "train.lr": 0.001})
    params = {k: str(v) for k, v in run_params(cfg).items()}
    tags = {"cbtlab.config_hash": cfg.config_hash()}
    again, warnings = rebuild_config(params, tags)
    assert again == cfg and warnings == []
    params["model.old_field"] = "7"
    del params["train.lr"]  # a field the run did not know: today's default is not its value
    again, warnings = rebuild_config(params, tags)
    assert again.train.lr == ExperimentConfig().train.lr
    assert any("model.old_field=7" in w and "does not have" in w for w in warnings)
    assert any("train.lr=0.005" in w and "did not log" in w for w in warnings)
    assert any(f"the run logged {cfg.config_hash()}" in w for w in warnings)


def test_provenance_differences_name_code_data_and_packages() -> None:
    logged = {
        "cbtlab.git_commit": "aaa", "cbtlab.git_dirty": "false", "cbtlab.data_hash": "d1",
        "cbtlab.version.torch": "2.14.1", "cbtlab.version.ray": "2.60.0",
    }  # fmt: skip
    assert provenance_differences(logged, dict(logged)) == []
    now = {**logged, "cbtlab.git_commit": "bbb", "cbtlab.git_dirty": "true",
           "cbtlab.data_hash": "d2", "cbtlab.version.torch": "2.15.0"}  # fmt: skip
    problems = provenance_differences({**logged, "cbtlab.git_dirty": "true"}, now)
    assert problems == [
        "code: the run was logged at git commit aaa, this code is at bbb",
        "code: the run's checkout had uncommitted changes, so its exact code is not recorded",
        "code: this checkout has uncommitted changes",
        "data: the dataset's content hash is d2, the run logged d1",
        "packages: torch 2.15.0 (logged 2.14.1)",
    ]
    assert "no git commit" in provenance_differences({"cbtlab.git_commit": "unknown"}, now)[0]


def test_seed_spread_skips_failed_seeds() -> None:
    spread = seed_spread("val/top1", {0: 0.5, 1: 0.7, 2: None})
    assert (spread.mean, spread.min, spread.max) == (pytest.approx(0.6), 0.5, 0.7)
    assert spread.std == pytest.approx(math.sqrt(0.02))
    assert math.isnan(seed_spread("val/top1", {0: 0.5}).std)


def test_reproduce_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reproduce_main(["--run-id", "x", "--seeds", "0"])
    assert exit_info.value.code == 2 and "--seeds must be >= 1" in capsys.readouterr().err


# --- a real tracking server, 4 trials at once, and an exact re-run ---------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on a free localhost port: a SQLite store, artifacts served from a
    folder (so clients upload them over HTTP). Yields (URL, artifacts folder, log file)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = root / "server.log"
    mlflow = Path(sys.executable).with_name("mlflow")
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "2",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield url, root / "artifacts", log
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def served_study(mlflow_server, ray_session: None, tmp_path_factory: pytest.TempPathFactory):
    """A grid of 2 cells x 2 seeds, 2 epochs each, all 4 trials at once (1 worker of 0.25 CPU
    each), logged to the tracking server."""
    url, artifacts, log = mlflow_server
    storage = tmp_path_factory.mktemp("served_study_ray")
    base = ExperimentConfig().with_overrides(
        {"model.depth": 1, "model.embed_dim": 24, "train.epochs": 2,
         "train.cpus_per_worker": 0.25}
    )  # fmt: skip
    spec = StudySpec(
        name="served",
        base=base,
        space={"model.rep_grid": ["2x2", "4x4"]},
        seeds=2,
        workers=1,
        max_concurrent=4,
        tracking_uri=url,
        storage_path=str(storage),
    )
    result = run_study(spec)
    return {"result": result, "url": url, "artifacts": artifacts, "log": log,
            "storage": storage}  # fmt: skip


@pytest.mark.ray
def test_a_study_with_four_trials_at_once_logs_to_a_tracking_server(served_study) -> None:
    result, url = served_study["result"], served_study["url"]
    assert result.failed == 0 and len(result.rows) == 4
    client = MlflowClient(url)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["study.max_concurrent"] == "4"
    experiment_id = parent.info.experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert len(children) == 4
    assert {(c.data.params["model.rep_grid"], c.data.params["train.seed"]) for c in children} == {
        (g, s) for g in ("2x2", "4x4") for s in ("0", "1")
    }
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert [m.step for m in history] == [1, 2]
    # All four ran at once: each started before any ended.
    assert max(c.info.start_time for c in children) < min(c.info.end_time for c in children)

    # The artifacts went through the server into its artifact folder.
    names = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"summary.txt", "summary.json", "stats.parquet", "stats.txt", "cells.json"} <= names
    on_server = served_study["artifacts"]
    [stats_file] = on_server.glob(f"**/{result.parent_run_id}/artifacts/stats.parquet")
    assert pq.read_table(stats_file).column("n").to_pylist() == [2, 2]
    assert (stats_file.parent / "summary.txt").read_text() == result.table
    server_log = served_study["log"].read_text()
    assert "database is locked" not in server_log and "Traceback" not in server_log


@pytest.mark.ray
def test_reproduce_gives_the_logged_metrics_exactly(
    served_study, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trial of cell 2x2, seed 0 re-run with --seeds 2: seed 0 equals the logged run at
    every epoch; seed 1 equals the study's own (2x2, seed 1) trial."""
    url, result = served_study["url"], served_study["result"]
    rows = {(r["model.rep_grid"], r["train.seed"]): r for r in result.rows}
    target = rows["2x2", 0]["run_id"]
    code = reproduce_main(
        ["--run-id", target, "--tracking-uri", url, "--seeds", "2",
         "--storage-path", str(served_study["storage"])]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    out = captured.out
    assert "REPRODUCED: every metric at every epoch equals the logged one exactly" in out
    assert "spread over seeds [0, 1] (final val/top1)" in out
    for metric in ("train/loss", "train/top1", "train/lr", "val/loss", "val/top1", "val/top5"):
        assert f"\n{metric} " in out  # a row of the comparison table
    # The test's checkout may be dirty; nothing else may differ from the study's run.
    for line in captured.err.splitlines():
        assert not line.startswith("warning: ") or line.startswith("warning: code: "), line

    client = MlflowClient(url)
    original = client.get_run(target)
    reruns = client.search_runs(
        [original.info.experiment_id], filter_string=f"tags.`{REPRODUCES_TAG}` = '{target}'"
    )
    sweep = next(r for r in reruns if r.data.tags["cbtlab.role"] == "reproduction_sweep")
    seeds = {
        int(r.data.params["train.seed"]): r
        for r in reruns
        if r.data.tags["cbtlab.role"] == "reproduction"
    }
    assert set(seeds) == {0, 1} and len(reruns) == 3
    assert sweep.data.tags["mlflow.parentRunId"] == target
    exact = seeds[0]
    assert exact.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    assert exact.data.tags[REPRODUCED_TAG] == "identical"
    assert exact.data.metrics["reproduce/max_abs_diff"] == 0
    assert exact.data.tags["cbtlab.config_hash"] == original.data.tags["cbtlab.config_hash"]
    for key in ("val/top1", "val/loss", "train/loss"):
        assert exact.data.metrics[key] == original.data.metrics[key]
    other = client.get_run(rows["2x2", 1]["run_id"])
    assert seeds[1].data.metrics["val/top1"] == other.data.metrics["val/top1"]
    finals = [original.data.metrics["val/top1"], other.data.metrics["val/top1"]]
    assert sweep.data.metrics["reproduce/val/top1/mean"] == pytest.approx(sum(finals) / 2)
    assert sweep.data.metrics["reproduce/val/top1/min"] == min(finals)
    assert "reproduction.txt" in {a.path for a in client.list_artifacts(exact.info.run_id)}
