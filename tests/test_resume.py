"""Resuming a study whose driver was killed: the finished trials are kept, the rest run, every
trial keeps one MLflow child run under the same parent, and the Optuna study lives on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ExperimentConfig
from cbtlab.paths import redact_url
from cbtlab.tune.cli import rep_count_main, rep_count_parser
from cbtlab.tune.definitions import rep_count_spec
from cbtlab.tune.spec import StudySpec, spec_from_dict, spec_to_dict
from cbtlab.tune.state import OPTUNA_FILE, STATE_FILE, latest_study_path, read_study_state

REPO = Path(__file__).resolve().parents[1]


def test_spec_round_trips_through_the_state_file_form() -> None:
    spec = rep_count_spec(
        rep_count_parser().parse_args(
            ["--seeds", "2", "--grids", "2x2,4x4", "--set", "model.depth=1", "--epochs", "3"]
        )
    ).validate()
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))).validate()
    assert again == spec
    search = StudySpec(
        "s",
        ExperimentConfig(),
        {"model.rep_grid": [(2, 2), "4x4"]},
        optuna_storage="postgresql://me:secret@db:5432/optuna",
    ).validate()
    data = spec_to_dict(search)
    assert "secret" not in json.dumps(data)
    assert data["optuna_storage"] == "postgresql://me:***@db:5432/optuna"
    assert spec_from_dict(data).space == {"model.rep_grid": [[2, 2], "4x4"]}
    assert redact_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_resume_without_a_study_names_what_it_looked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = rep_count_main(["--resume", "--storage-path", str(tmp_path), "--name", "gone"])
    assert code == 1
    assert f"no study 'gone' to resume under {tmp_path}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        read_study_state(str(tmp_path / "gone-12345678"))
    with pytest.raises(FileNotFoundError):
        latest_study_path(str(tmp_path), "gone")


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n"
                                 + log.read_text()[-4000:])  # fmt: skip
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-4000:])


@pytest.mark.ray
def test_a_killed_study_resumes_with_one_run_per_trial(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Start a 2-trial search in a driver of its own (on this session's Ray) and SIGKILL it
    once the first trial has finished (and Tune has saved that) and the second has logged its
    first epoch; then resume it here."""
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    flags = ["--name", "resumable", "--tracking-uri", uri, "--storage-path", str(storage)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), *sys.path])}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, str(REPO / "studies" / "rep_count_ablation.py"), *flags,
                "--num-samples", "2", "--grids", "2x2,4x2", "--epochs", "3", "--no-asha",
                "--workers", "1", "--set", "model.depth=1", "--set", "model.embed_dim=24",
                "--address", ray.get_runtime_context().gcs_address,
            ],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = MlflowClient(uri)

    def children() -> list:
        experiment = client.get_experiment_by_name("resumable")
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id])
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    def first_finished() -> tuple[str, float] | None:
        done = [r for r in children() if r.info.status == "FINISHED"]
        return (done[0].info.run_name, done[0].info.end_time / 1000) if done else None

    try:
        first, finished_at = _wait_for(first_finished, "a finished trial", proc, log)
        folder = _wait_for(lambda: list(storage.glob(f"resumable-*/{STATE_FILE}")),
                           "the study state", proc, log)[0].parent  # fmt: skip

        def saved_after_first() -> bool:  # Tune saves its state at most every 10 s
            states = list(folder.glob("experiment_state-*.json"))
            return bool(states) and max(p.stat().st_mtime for p in states) > finished_at + 0.5

        _wait_for(saved_after_first, "Tune saving the finished trial", proc, log, 60)

        def second_after_one_epoch() -> str | None:
            for run in children():
                if run.info.run_name != first and "val/top1" in run.data.metrics:
                    assert run.info.status == "RUNNING", "the second trial ended too soon"
                    return run.info.run_name
            return None

        second = _wait_for(second_after_one_epoch, "the second trial's first epoch", proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    capsys.readouterr()

    code = rep_count_main(["--resume", *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"resuming {folder}" in out
    assert f"[{first}]" not in out.split("\n\n")[0]  # the finished trial neither ran nor restored
    assert f"[{second}] restored: continues its run after 1 epochs" in out
    # Its Train run went on from its epoch-1 checkpoint.
    assert f"[{second}] epoch 1/3" not in out and f"[{second}] epoch 3/3" in out

    experiment = client.get_experiment_by_name("resumable")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(kids) == 2, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["cbtlab.resumed"] == "1"
    assert parent.data.tags["cbtlab.trials"] == "2"
    assert len({c.data.tags["cbtlab.trial_id"] for c in kids}) == 2
    assert {c.data.params["model.rep_grid"] for c in kids} == {"2x2", "4x2"}
    for child in kids:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["cbtlab.epochs_completed"] == "3"
        history = client.get_metric_history(child.info.run_id, "val/top1")
        assert [m.step for m in history] == [1, 2, 3]  # nothing logged twice
        assert child.data.metrics["best/val/top1"] == max(m.value for m in history)

    state = read_study_state(str(folder))
    assert state.parent_run_id == parent.info.run_id
    assert parent.data.params["study.optuna_study"] == state.run_name
    study = optuna.load_study(
        study_name=state.run_name, storage=f"sqlite:///{folder / OPTUNA_FILE}"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
