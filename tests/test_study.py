"""A tiny study end to end on local Ray: the MLflow parent/child structure it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ExperimentConfig
from cbtlab.tracking.schema import study_from_mlflow
from cbtlab.tune.cli import rep_count_main
from cbtlab.tune.runner import run_study
from cbtlab.tune.spec import StudySpec
from synthetic_study import Outcome, write_study


@pytest.mark.ray
def test_tiny_study_writes_parent_and_nested_children(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = rep_count_main(
        [
            "--num-samples", "2",
            "--epochs", "1",
            "--grids", "2x2,4x2",
            "--name", "tiny_study",
            "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"),
            "--set", "model.depth=1",
            "--set", "model.embed_dim=24",
            # Mid-epoch checkpoints stay with Ray Train: no extra results in Tune or MLflow.
            "--set", "train.checkpoint_every_steps=5",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "representatives" in out and "ui --backend-store-uri " + uri in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny_study")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cbtlab.study"] == "tiny_study"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.txt", "answer.txt", "answer.json"} <= artifacts
    # The answer is taken at the budget both trials reached, and says so.
    assert "best at epoch 1, the budget every compared trial reached (2 trials" in out
    assert parent.data.metrics["best/budget_epoch"] == 1
    assert parent.data.tags["cbtlab.best_cell"] in {"model.rep_grid=2x2", "model.rep_grid=4x2"}
    assert "val/top1 @ epoch 1" in out
    grids = set()
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        for tag in ("cbtlab.study", "cbtlab.trial_id", "cbtlab.git_commit", "cbtlab.config_hash"):
            assert child.data.tags[tag]
        # The trial's latest checkpoint is findable from its run (probes and re-runs load it).
        assert Path(child.data.tags["cbtlab.checkpoint"], "state.pt").is_file()
        params = child.data.params
        grids.add(params["model.rep_grid"])
        assert params["model.num_representatives"] == str(
            eval(params["model.rep_grid"].replace("x", "*"))
        )
        assert params["model.depth"] == "1"
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert [m.step for m in history] == [1]
        assert 0 <= history[0].value <= 1
        for key in ("train/loss", "train/top5", "perf/images_per_s", "perf/data_wait_fraction"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1], key
    assert grids == {"2x2", "4x2"}

    # The dashboard rebuilds the same table from MLflow alone.
    found_parent, keys, metric, mode, rows = study_from_mlflow(uri, "tiny_study")
    assert found_parent.info.run_id == parent.info.run_id
    assert (keys, metric, mode) == (["model.rep_grid"], "val/top1", "max")
    assert {r["model.rep_grid"] for r in rows} == {"2x2", "4x2"}
    for row in rows:
        child = next(c for c in children if c.info.run_name == row["trial"])
        assert row["best"] == child.data.metrics["best/val/top1"]
        assert row["epochs"] == "1" and row["status"] == "FINISHED"


def test_bad_flag_value_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rep_count_main(["--set", "model.step_init=ones"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.step_init" in err and "'normal', 'constant', 'zero'" in err


def test_bad_grid_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        rep_count_main(["--grids", "2x2,9x9"])
    err = capsys.readouterr().err
    assert "model.rep_grid" in err and "9x9 exceeds the 8x8 patch grid" in err


@pytest.mark.ray
def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    ray_session: None, tmp_path: Path
) -> None:
    """A trial whose workers raise (a global batch larger than a rank's data) fails alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ExperimentConfig().with_overrides(
        {"model.depth": 1, "model.embed_dim": 24, "train.epochs": 1}
    )
    spec = StudySpec(
        name="failing_trial",
        base=base,
        space={"data.batch_size": [64, 4096]},
        initial_points=[{"data.batch_size": 64}, {"data.batch_size": 4096}],
        num_samples=2,
        asha=False,
        tracking_uri=uri,
        storage_path=str(tmp_path / "ray"),
    )
    result = run_study(spec)
    assert result.failed == 1
    by_batch = {r["data.batch_size"]: r for r in result.rows}
    assert by_batch[64]["status"] == "FINISHED" and by_batch[4096]["status"] == "FAILED"

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cbtlab.failed"] == "1"
    failed_child = client.get_run(by_batch[4096]["run_id"])
    assert failed_child.info.status == "FAILED"
    assert "fewer than one batch of 2048" in failed_child.data.tags["cbtlab.error"]


@pytest.mark.ray
def test_a_diverging_trial_fails_at_once_with_the_reason(ray_session: None, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ExperimentConfig().with_overrides(
        {"model.depth": 1, "model.embed_dim": 24, "train.epochs": 3, "train.grad_clip": 0,
         "train.warmup_epochs": 0}
    )  # fmt: skip
    spec = StudySpec(
        name="diverging",
        base=base,
        space={"train.lr": [1e30]},
        initial_points=[{"train.lr": 1e30}],
        num_samples=1,
        tracking_uri=uri,
        storage_path=str(tmp_path / "ray"),
    )
    result = run_study(spec)
    assert result.failed == 1 and result.rows[0]["status"] == "FAILED"
    child = MlflowClient(uri).get_run(result.rows[0]["run_id"])
    assert child.info.status == "FAILED"
    error = child.data.tags["cbtlab.error"]
    assert "non-finite training loss at epoch 0, step 1" in error
    # Not run again (each restart would fail the same way, on the checkpoint it marked).
    assert "marks a diverged run" not in error, error


def test_a_restarted_trial_logs_each_epoch_once(tmp_path: Path) -> None:
    study = write_study(tmp_path, seeds=1, outcomes={0: Outcome(restarted_after=1)}, probes=False)
    run_id = study.trials[0]["run_id"]
    client = MlflowClient(study.uri)
    epochs = len(client.get_metric_history(study.trials[1]["run_id"], "val/top1"))
    for key in ("val/top1", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == list(range(1, epochs + 1)), (key, steps)
