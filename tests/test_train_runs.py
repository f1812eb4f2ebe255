"""`cbtlab train` runs: each new run its own name, an unfinished run continued only when asked
(said aloud with the fields that changed), a finished one never."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cbtlab.train.cli import train_main
from cbtlab.train.runs import (
    FINISHED,
    RUN_FILE,
    RunChoiceError,
    RunRecord,
    choose_run,
    continue_note,
    new_run_name,
    read_run,
    write_run,
)

TINY = ["--set", "model.embed_dim=24", "--set", "model.depth=1", "--set", "model.rep_grid=2x2"]


def _record(storage: Path, name: str, status: str, **config: object) -> RunRecord:
    record = RunRecord(name, str(storage), {"train.epochs": 1, **config}, status=status)
    write_run(record)
    return record


def test_new_run_names_are_dated_and_never_repeat() -> None:
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    names = {new_run_name(now=now) for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"train-20260102-030405-[0-9a-f]{6}", n) for n in names)


def test_a_run_is_new_unless_an_unfinished_one_is_asked_for(tmp_path: Path) -> None:
    assert not choose_run(str(tmp_path), None, resume_latest=False).continues
    assert choose_run(str(tmp_path), "fresh", resume_latest=False).name == "fresh"
    _record(tmp_path, "killed", "running")
    _record(tmp_path, "done", FINISHED)
    # Even with unfinished runs around, a run without --name or --resume is a new one.
    default = choose_run(str(tmp_path), None, resume_latest=False)
    assert not default.continues and default.name.startswith("train-")
    chosen = choose_run(str(tmp_path), "killed", resume_latest=False)
    assert chosen.continues and chosen.previous.config == {"train.epochs": 1}
    latest = choose_run(str(tmp_path), None, resume_latest=True)
    assert latest.name == "killed"
    with pytest.raises(RunChoiceError, match="'done' finished"):
        choose_run(str(tmp_path), "done", resume_latest=False)
    with pytest.raises(RunChoiceError, match="no run 'gone' to resume"):
        choose_run(str(tmp_path), "gone", resume_latest=True)
    (tmp_path / "train").mkdir()  # a run of the old default name, without a record
    with pytest.raises(RunChoiceError, match=f"holds no {RUN_FILE}"):
        choose_run(str(tmp_path), "train", resume_latest=False)


def test_resume_alone_needs_an_unfinished_run(tmp_path: Path) -> None:
    _record(tmp_path, "done", FINISHED)
    with pytest.raises(RunChoiceError, match="no unfinished run to resume"):
        choose_run(str(tmp_path), None, resume_latest=True)


def test_continuing_names_the_fields_that_changed(tmp_path: Path) -> None:
    _record(tmp_path, "killed", "running", **{"train.lr": 0.005})
    choice = choose_run(str(tmp_path), "killed", resume_latest=False)
    note = continue_note(choice, {"train.epochs": 2, "train.lr": 0.005})
    assert note.startswith("continuing the unfinished run killed (started ")
    assert note.endswith("config fields changed: train.epochs: 1 -> 2")
    same = continue_note(choice, {"train.epochs": 1, "train.lr": 0.005})
    assert same.endswith("no config field changed")


def test_train_refuses_a_finished_run_by_name(tmp_path: Path, capsys) -> None:
    _record(tmp_path, "done", FINISHED)
    with pytest.raises(SystemExit) as stop:
        train_main(["--name", "done", "--storage-path", str(tmp_path)], prog="cbtlab train")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "the run 'done' finished at" in err and "Traceback" not in err


def _run(argv: list[str], capsys) -> tuple[str, dict]:
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{") : out.rindex("}") + 1])
    return out, metrics


def _checkpoints(run: Path) -> list[Path]:
    return [p for p in run.glob("checkpoint_*") if p.is_dir()]


@pytest.mark.ray
def test_a_second_run_is_new_and_only_a_named_unfinished_run_continues(
    ray_session: None, tmp_path: Path, capsys
) -> None:
    """The issue's case: after `--set train.epochs=1`, a plain `--set train.epochs=2` trained
    only epoch 2, from the first run's checkpoint, as both took the name `train`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    flags = [*TINY, "--storage-path", str(runs), "--tracking-uri", uri]
    _run([*flags, "--set", "train.epochs=1"], capsys)
    first = {p.name for p in runs.iterdir()}
    _run([*flags, "--set", "train.epochs=2"], capsys)
    second = {p.name for p in runs.iterdir()} - first
    assert len(first) == len(second) == 1
    (a,), (b,) = first, second
    # The second run trained both of its epochs itself: two checkpoints of its own.
    assert len(_checkpoints(runs / b)) == 2
    assert read_run(str(runs), b).status == FINISHED

    # The first run, as a killed driver leaves it, continued by name to a second epoch.
    record = read_run(str(runs), a)
    record.status = "running"
    write_run(record)
    out, metrics = _run([*flags, "--set", "train.epochs=2", "--name", a], capsys)
    assert f"continuing the unfinished run {a}" in out
    assert "config fields changed: train.epochs: 1 -> 2" in out
    assert metrics["epoch"] == 2
    # One new checkpoint beside the first run's: it trained epoch 2 only.
    assert len(_checkpoints(runs / a)) == 2
    assert {p.name for p in runs.iterdir()} == {a, b}
    assert read_run(str(runs), a).config["train.epochs"] == 2

    # MLflow: one run per training run, named as it, each epoch logged once (the continued
    # run's restart reported epoch 1 again), ended FINISHED, with its checkpoint.
    client = MlflowClient(uri)
    logged = {r.info.run_name: r for r in client.search_runs([_experiment_id(client, "train")])}
    assert set(logged) == {a, b}
    for name in (a, b):
        run = logged[name]
        assert run.info.run_id == read_run(str(runs), name).mlflow_run_id
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")]
        assert steps == [1, 2], (name, steps)
        assert run.data.tags["cbtlab.epochs_completed"] == "2"
        assert run.data.tags["cbtlab.checkpoint"].startswith(str(runs / name))
        assert run.data.params["model.embed_dim"] == "24"
    assert logged[a].data.tags["cbtlab.continued_with"] == "train.epochs: 1 -> 2"


def _experiment_id(client: MlflowClient, name: str) -> str:
    return client.get_experiment_by_name(name).experiment_id


def test_an_unreachable_mlflow_server_stops_train_before_anything(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        train_main([*TINY, "--storage-path", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"])
    assert stop.value.code == 2
    assert "cannot reach the MLflow tracking server 'http://127.0.0.1:9'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run, no record
