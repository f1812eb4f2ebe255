"""A running study's progress line (cbtlab.tune.progress): counts from Tune's trials, the best
value so far by the study's mode, and the time left from this driver's pace."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import pytest

from cbtlab.train.messages import DeterministicFailure, Diverged
from cbtlab.tune import progress
from cbtlab.tune.progress import Best, StudyProgress, progress_line


@dataclass
class FakeTrial:
    trial_id: str
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"trial_{self.trial_id}"


def test_the_line_counts_names_the_best_and_estimates_the_time_left() -> None:
    best = Best(0.525, "trial_b", 3)
    line = progress_line(
        done=3, failed=1, total=12, metric="val/top1", best=best, ended_here=3, elapsed_s=90
    )
    # 30 s a trial at this pace, 9 trials left: 270 s.
    assert line == (
        "progress: 3/12 trials done (1 failed), best val/top1 0.5250 (trial_b, epoch 3), "
        "about 4 min left"
    )
    assert (
        progress_line(
            done=12, failed=0, total=12, metric="m", best=None, ended_here=12, elapsed_s=60
        )
        == "progress: 12/12 trials done"
    )
    # No trial ended under this driver yet (a restored study): no estimate.
    assert "left" not in progress_line(
        done=4, failed=0, total=8, metric="m", best=None, ended_here=0, elapsed_s=60
    )


@pytest.mark.parametrize(("mode", "expected"), [("max", 0.9), ("min", 0.2)])
def test_the_callback_follows_the_study(mode, expected, monkeypatch, capsys) -> None:
    clock = iter([1000.0, 1000.0, 1060.0, 1120.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    done_before = FakeTrial("old", "TERMINATED", {"val/top1": 0.5, "epoch": 4})
    a, b, c = FakeTrial("a"), FakeTrial("b"), FakeTrial("c")
    trials = [done_before, a, b, c]
    callback = StudyProgress(total=4, metric="val/top1", mode=mode)
    callback.setup()
    callback.on_trial_result(1, trials, a, {"val/top1": 0.2, "epoch": 1})
    callback.on_trial_result(2, trials, b, {"val/top1": 0.9, "epoch": 1})
    callback.on_trial_result(3, trials, b, {"val/top1": float("nan"), "epoch": 2})
    callback.on_trial_complete(4, trials, a)
    a.status = "TERMINATED"
    callback.on_trial_error(5, trials, b)
    first, second = capsys.readouterr().out.splitlines()
    # The trial ended before a restore counts, and so does its last result for the best.
    assert first.startswith("progress: 2/4 trials done, best val/top1 ")
    assert f"best val/top1 {expected:.4f}" in second and "3/4 trials done (1 failed)" in second
    assert second.endswith("about 60 s left")  # 2 trials in 120 s, 1 left


def test_a_trials_bad_value_errors_reach_the_driver_as_themselves() -> None:
    """Raised in a trial, they are unpickled in the study's driver: before, Diverged's failed
    there (`__init__() missing 1 required positional argument`) and its reason was lost."""
    diverged = pickle.loads(pickle.dumps(Diverged(2, 7)))
    assert (diverged.epoch, diverged.step) == (2, 7) and "epoch 2, step 7" in str(diverged)
    failure = pickle.loads(pickle.dumps(DeterministicFailure(1, "ValueError", "bad lr")))
    assert str(failure).startswith("rank 1 raised ValueError: bad lr")


def test_a_diverged_trials_worst_values_are_not_the_best(capsys) -> None:
    callback = StudyProgress(total=2, metric="val/loss", mode="min")
    a, b = FakeTrial("a"), FakeTrial("b")
    callback.on_trial_result(1, [a, b], a, {"val/loss": 2.0, "epoch": 1})
    callback.on_trial_result(1, [a, b], b, {"val/loss": 0.0, "train/diverged": 1.0, "epoch": 1})
    callback.on_trial_error(2, [a, b], b)
    assert "best val/loss 2.0000 (trial_a, epoch 1)" in capsys.readouterr().out
