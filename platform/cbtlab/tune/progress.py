"""A running study's progress, said each time a trial ends: trials done of the total, the best
value so far and an estimate of the time left.

The counts come from Tune's own list of trials, so a resumed study (whose callbacks Tune
restores from the study's state) counts the trials finished before it too; the time left is
estimated from the trials ended since this driver started (with as many running at once as
before), which is all a driver that was restarted knows of its pace.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from cbtlab.train.messages import DIVERGED_KEY

# Tune's statuses of a trial that will not run again.
ENDED = ("TERMINATED", "ERROR")


@dataclass
class Best:
    value: float
    trial: str
    epoch: int


def progress_line(
    *,
    done: int,
    failed: int,
    total: int,
    metric: str,
    best: Best | None,
    ended_here: int,
    elapsed_s: float,
) -> str:
    """`progress: 3/12 trials done (1 failed), best val/top1 0.5250 (trial_x, epoch 3), about
    4 min left`; the time left only once a trial ended under this driver."""
    text = f"progress: {done}/{total} trials done"
    if failed:
        text += f" ({failed} failed)"
    if best is not None:
        text += f", best {metric} {best.value:.4f} ({best.trial}, epoch {best.epoch})"
    left = total - done
    if left <= 0:
        return text
    if ended_here > 0 and elapsed_s > 0:
        text += f", about {_duration(elapsed_s / ended_here * left)} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class StudyProgress(Callback):
    """Says `progress_line` (on stdout) each time a trial of the study ends."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        self.total = total
        self.metric = metric
        self.mode = mode
        self.best: Best | None = None
        self.failed: dict[str, bool] = {}  # ended trials: whether each failed
        self.started = time.time()
        self.ended_here = 0

    def setup(self, **info: Any) -> None:
        # Also after a restore: the pace is this driver's.
        self.started = time.time()
        self.ended_here = 0

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._consider(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, failed=True)

    def _consider(self, trial: Any, result: dict) -> None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if result.get(DIVERGED_KEY):  # the worst values a diverged trial reports
            return
        if self.best is None or (
            value > self.best.value if self.mode == "max" else value < self.best.value
        ):
            epoch = int(result.get("epoch", result.get("training_iteration", 0)))
            self.best = Best(float(value), str(trial), epoch)

    def _ended(self, trials: list, trial: Any, *, failed: bool) -> None:
        self.ended_here += 1
        self.failed[trial.trial_id] = failed
        for other in trials:  # those ended before a restore, as Tune kept them
            if other.trial_id not in self.failed and other.status in ENDED:
                self.failed[other.trial_id] = other.status == "ERROR"
                self._consider(other, getattr(other, "last_result", None) or {})
        line = progress_line(
            done=len(self.failed),
            failed=sum(self.failed.values()),
            total=max(self.total, len(trials)),
            metric=self.metric,
            best=self.best,
            ended_here=self.ended_here,
            elapsed_s=time.time() - self.started,
        )
        print(line, file=sys.stdout, flush=True)
