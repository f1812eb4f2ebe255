"""Resuming a study whose driver was killed: the finished trials are kept, the rest run, every
trial keeps one MLflow child run under the same parent, and the Optuna study lives on disk."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
                "--max-concurrent", "1", "--workers", "1", "--set", "model.depth=1",
                "--set", "model.embed_dim=24",
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


def _trial_table(uri: str, name: str) -> list[tuple]:
    """A study's trials in the order they started: cell, epochs, stopped early, status and
    every epoch's val/top1 (each logged once)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    kids = sorted(
        (r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time
    )
    table = []
    for run in kids:
        history = client.get_metric_history(run.info.run_id, "val/top1")
        table.append(
            (
                run.data.params["model.rep_grid"],
                run.data.tags["cbtlab.epochs_completed"],
                run.data.tags["cbtlab.stopped_early"],
                run.info.status,
                sorted((m.step, m.value) for m in history),
            )
        )
    return table


@pytest.mark.ray
def test_a_resumed_search_stops_the_trials_that_asha_stopped(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2-trial search with ASHA (4 epochs, one rung at epoch 3) run once through stops its
    second trial at the rung. The same search, its driver SIGKILLed while the second trial is
    before the rung and resumed, gives the same table: the restarted trial goes on from its
    checkpoint and is stopped at the same epoch (the scheduler's rung was read back, and the
    rung is reached at the trial's reported epoch, not at its count of Tune results)."""
    import ray

    search = [
        "--num-samples", "2", "--grids", "2x2,4x4", "--epochs", "4", "--grace-period", "3",
        "--search-seed", "0", "--workers", "1", "--set", "model.depth=1",
        "--set", "model.embed_dim=24", "--max-concurrent", "1",  # results in a fixed order
    ]  # fmt: skip

    def flags(name: str) -> tuple[str, list[str]]:
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        storage = str(tmp_path / name / "ray")
        return uri, ["--name", name, "--tracking-uri", uri, "--storage-path", storage]

    once_uri, once = flags("asha_once")
    assert rep_count_main([*search, *once]) == 0
    capsys.readouterr()
    want = _trial_table(once_uri, "asha_once")
    assert [row[:4] for row in want] == [
        ("2x2", "4", "false", "FINISHED"),
        ("4x4", "3", "true", "FINISHED"),
    ], want

    uri, killed = flags("asha_killed")
    storage = tmp_path / "asha_killed" / "ray"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), *sys.path])}
    log = tmp_path / "driver.log"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the database before the driver opens it
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, str(REPO / "studies" / "rep_count_ablation.py"), *search,
                *killed, "--address", ray.get_runtime_context().gcs_address,
            ],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def second_trial_mid_way() -> str | None:
        """The second trial's run once it logged an epoch and Tune has saved it (Tune saves at
        most every 10 s: one it had not saved would come back as a new trial)."""
        experiment = client.get_experiment_by_name("asha_killed")
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id])
        kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        second = [r for r in kids if r.data.params.get("model.rep_grid") == "4x4"]
        if not second or "val/top1" not in second[0].data.metrics:
            return None
        states = list(next(storage.glob("asha_killed-*")).glob("experiment_state-*.json"))
        started_at = second[0].info.start_time / 1000
        if not states or max(p.stat().st_mtime for p in states) < started_at + 0.5:
            return None
        return second[0].info.run_name

    try:
        second = _wait_for(second_trial_mid_way, "the second trial's first epoch", proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    capsys.readouterr()

    assert rep_count_main(["--resume", *killed]) == 0
    out = capsys.readouterr().out
    restored = re.search(rf"\[{second}\] restored: continues its run after (\d) epochs", out)
    assert restored, out
    assert int(restored[1]) < 3, f"killed too late (after the rung): a slow poll?\n{out}"
    assert _trial_table(uri, "asha_killed") == want


# --- the study scheduler's state, without Ray training ----------------------------------------

# val/top1 per epoch of five trials run one after another (epochs 4, grace 2, rf 2: rungs at
# epochs 2 and 4). Uninterrupted, ASHA stops b and d at epoch 2.
ASHA_VALUES = {
    "a": [0.30, 0.50, 0.60, 0.70],
    "b": [0.20, 0.40, 0.45, 0.50],
    "c": [0.35, 0.60, 0.65, 0.72],
    "d": [0.25, 0.42, 0.50, 0.55],
    "e": [0.31, 0.55, 0.58, 0.66],
}


class _Trials:
    """Tune as the scheduler sees it: trials with ids and a storage folder, and get_trials()."""

    def __init__(self, folder: Path) -> None:
        import pyarrow.fs

        self.storage = SimpleNamespace(
            storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(folder)
        )
        self.trials: list[SimpleNamespace] = []

    def get_trials(self) -> list[SimpleNamespace]:
        return self.trials

    def add(self, scheduler, trial_id: str) -> SimpleNamespace:
        trial = SimpleNamespace(trial_id=trial_id, storage=self.storage)
        self.trials.append(trial)
        scheduler.on_trial_add(self, trial)
        return trial


def _new_scheduler():
    from cbtlab.tune.scheduler import StudyScheduler

    scheduler = StudyScheduler(max_t=4, grace_period=2, reduction_factor=2)
    assert scheduler.set_search_properties("val/top1", "max")
    return scheduler


def _result(name: str, epoch: int) -> dict:
    return {"epoch": epoch, "val/top1": ASHA_VALUES[name][epoch - 1], "training_iteration": 1}


def _uninterrupted(folder: Path) -> tuple[list[tuple], dict[tuple[str, int], str]]:
    """The events of the study run once through (("add"|"result"|"complete", name, epoch)),
    and the decision taken at each (trial, epoch)."""
    scheduler, tune = _new_scheduler(), _Trials(folder)
    events, decisions = [], {}
    for name in ASHA_VALUES:
        trial = tune.add(scheduler, name)
        events.append(("add", name, 0))
        for epoch in range(1, 5):
            decision = scheduler.on_trial_result(tune, trial, _result(name, epoch))
            events.append(("result", name, epoch))
            decisions[name, epoch] = decision
            if decision == "STOP":
                break
        scheduler.on_trial_complete(tune, trial, _result(name, epoch))
        events.append(("complete", name, epoch))
    return events, decisions


def _replay(scheduler, tune: _Trials, events: list[tuple], ids: dict[str, str]) -> None:
    """The first driver: `events` as Tune delivers them, trial ids from `ids`."""
    trials = {}
    for kind, name, epoch in events:
        if kind == "add":
            trials[name] = tune.add(scheduler, ids[name])
        elif kind == "result":
            scheduler.on_trial_result(tune, trials[name], _result(name, epoch))
        else:
            scheduler.on_trial_complete(tune, trials[name], _result(name, epoch))


def _rungs_by_trial(scheduler, names: dict[str, str]) -> list[dict[str, float]]:
    return [
        {names[t]: v for t, v in rung["values"].items()}
        for rung in scheduler.state()["brackets"][0]
    ]


def test_study_scheduler_stops_on_the_reported_epoch_and_records_once(tmp_path: Path) -> None:
    _, decisions = _uninterrupted(tmp_path / "once")
    stops = {name: epoch for (name, epoch), d in decisions.items() if d == "STOP"}
    assert stops == {"a": 4, "b": 2, "c": 4, "d": 2, "e": 4}
    scheduler, tune = _new_scheduler(), _Trials(tmp_path / "clock")
    trial = tune.add(scheduler, "b")
    tune.add(scheduler, "a")
    for epoch in (1, 2):
        scheduler.on_trial_result(tune, tune.trials[1], _result("a", epoch))
    # A trial restarted at epoch 2 (its first Tune result, training_iteration 1) hits the rung.
    assert scheduler.on_trial_result(tune, trial, _result("b", 2)) == "STOP"
    saved = json.loads((tmp_path / "clock" / "cbtlab_asha.json").read_text())
    assert saved["brackets"][0][1] == {"milestone": 2, "values": {"a": 0.5, "b": 0.4}}
    assert saved["stopped"] == {"b": 2}
    # Re-reported epochs record nothing and keep the decisions taken.
    assert scheduler.on_trial_result(tune, trial, _result("b", 1)) == "CONTINUE"
    assert scheduler.on_trial_result(tune, trial, _result("b", 3)) == "STOP"
    assert scheduler.on_trial_result(tune, tune.trials[1], _result("a", 2)) == "CONTINUE"
    assert scheduler.state() == saved


def test_study_scheduler_decides_the_same_after_a_resume_whenever_tune_saved(
    tmp_path: Path,
) -> None:
    """Kill the first driver after any event; Tune's saved state may be older (any earlier
    event); the interrupted trial's Train run may restart from its latest epoch or one before.
    The resumed scheduler, unpickled as it was before the study ran (tuner.pkl), takes every
    decision the uninterrupted one took and ends with the same rungs."""
    events, decisions = _uninterrupted(tmp_path / "once")
    stops = {name: epoch for (name, epoch), d in decisions.items() if d == "STOP"}
    reference = _uninterrupted(tmp_path / "again")  # a second run writes the same state
    assert reference[1] == decisions
    pickled = pickle.dumps(_new_scheduler())
    final = _new_scheduler()
    _replay(final, _Trials(tmp_path / "final"), events, {n: n for n in ASHA_VALUES})
    want = _rungs_by_trial(final, {n: n for n in ASHA_VALUES})

    scenarios = 0
    for kill in range(1, len(events) + 1):
        for saved in range(kill + 1):
            for lag in (0, 1, 2):
                folder = tmp_path / f"{kill}-{saved}-{lag}"
                first, tune = _new_scheduler(), _Trials(folder)
                _replay(first, tune, events[:kill], {n: f"{n}1" for n in ASHA_VALUES})
                # What Tune saved: the trials it knew of, and which of them had completed.
                known = {name for kind, name, _ in events[:saved] if kind == "add"}
                done = {name for kind, name, _ in events[:saved] if kind == "complete"}
                reached = {}
                for kind, name, epoch in events[:kill]:
                    if kind == "result":
                        reached[name] = epoch

                scheduler, tune = pickle.loads(pickled), _Trials(folder)
                ids = {}
                for name in ASHA_VALUES:
                    if name in known:  # restored by Tune, its id kept
                        ids[name] = f"{name}1"
                        tune.add(scheduler, ids[name])
                for name in ASHA_VALUES:
                    if name in done:
                        continue
                    if name in known:
                        trial = next(t for t in tune.trials if t.trial_id == ids[name])
                        start = max(0, reached.get(name, 0) - lag) + 1  # its checkpoint + 1
                    else:  # Tune had not saved it: the searcher asks again, a new id
                        ids[name] = f"{name}2"
                        trial, start = tune.add(scheduler, ids[name]), 1
                    epoch = 4  # a Train run restored after its last epoch reports nothing
                    for epoch in range(start, 5):
                        decision = scheduler.on_trial_result(tune, trial, _result(name, epoch))
                        want_decision = decisions.get((name, epoch), "STOP")
                        assert decision == want_decision, (kill, saved, lag, name, epoch)
                        if decision == "STOP":
                            break
                    assert epoch == max(stops[name], min(start, 4)), (kill, saved, lag, name)
                    scheduler.on_trial_complete(tune, trial, _result(name, epoch))
                names = {i: n for n, i in ids.items()}
                assert _rungs_by_trial(scheduler, names) == want, (kill, saved, lag)
                scenarios += 1
    assert scenarios > 1000
