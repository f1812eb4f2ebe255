"""Test hooks: a failure that a test injects into the worker loop, passed in by the test
(`run_training(fail_at=...)`, `build_trainer(fail_at=...)`, the GPU check's `RankPlan`), never
read from a config."""

from __future__ import annotations

from dataclasses import dataclass


class InjectedFailure(RuntimeError):
    """The failure a `FailAt` injects."""


@dataclass(frozen=True)
class FailAt:
    """Rank `rank` raises InjectedFailure at micro-batch `step` of epoch `epoch` (both counted
    from 0) of a run that did not start from a checkpoint, so that a restart from the last
    checkpoint goes on. Picklable: it travels to Ray Train's workers in the trainer's
    `train_loop_config`, and to the GPU check's spawned ranks in their plan."""

    epoch: int
    step: int
    rank: int

    def check(self, epoch: int, step: int, rank: int) -> None:
        """Raise InjectedFailure at this point of the run."""
        if (epoch, step, rank) == (self.epoch, self.step, self.rank):
            raise InjectedFailure(f"injected failure at epoch {epoch}, step {step}, rank {rank}")
