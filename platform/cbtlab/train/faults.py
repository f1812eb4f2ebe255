"""Test hooks: a failure that a test injects into the worker loop, passed in by the test
(`run_training(fail_at=...)`, `build_trainer(fail_at=...)`, the GPU check's `RankPlan`), never
read from a config."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """The failure a `FailAt` injects by default."""


@dataclass(frozen=True)
class FailAt:
    """Rank `rank` fails at micro-batch `step` of epoch `epoch` (both counted from 0) of a run
    that did not start from a checkpoint, so that a restart from the last checkpoint goes on.
    Picklable: it travels to Ray Train's workers in the trainer's `train_loop_config`, and to
    the GPU check's spawned ranks in their plan.

    The failure raises `error` (InjectedFailure, a crash-like RuntimeError; ValueError for a
    bad value, which is not retried), or with `kill` ends the worker's process at once, as a
    killed worker. Each firing first leaves a file in the folder `record`, if given, so that a
    test counts the attempts that reached it."""

    epoch: int
    step: int
    rank: int
    error: type[Exception] = InjectedFailure
    kill: bool = False
    record: str = ""

    def check(self, epoch: int, step: int, rank: int) -> None:
        """Fail at this point of the run."""
        if (epoch, step, rank) != (self.epoch, self.step, self.rank):
            return
        if self.record:
            Path(self.record, f"fired-{os.getpid()}-{time.time_ns()}").touch()
        if self.kill:
            os._exit(1)
        raise self.error(f"injected failure at epoch {epoch}, step {step}, rank {rank}")
