"""What the workers tell the driver through their reported metrics: a divergence (`Diverged`,
whose metrics carry DIVERGED_KEY and the worst values DIVERGED_WORST) and a mid-epoch
checkpoint (metrics carrying MID_EPOCH_KEY). The worker loop writes them; the trainer's `fit`
and the driver's callbacks read them. And what the driver makes of a worker's error: a bad
value (`DeterministicFailure`), which no restart would cure, or a crash, which Ray Train
retries."""

from __future__ import annotations

import math
from typing import Any

MID_EPOCH_KEY = "checkpoint/mid_epoch"
DIVERGED_KEY = "train/diverged"
DIVERGED_WORST = {
    "val/top1": 0.0,
    "val/top5": 0.0,
    "val/miou": 0.0,
    "val/pixel_acc": 0.0,
    "val/loss": math.inf,
    "train/loss": math.inf,
}


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite on some rank (raised on every rank alike, at
    most `DivergenceGuard.every - 1` micro-batches later: see `cbtlab.train.metrics`).

    It travels from the workers to the driver as a result: `as_metrics()` in the workers'
    last report, `from_metrics()` where that report arrives (the trial, the MLflow callback).
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite training loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a trial, unpickled in the study driver
        return (type(self), (self.epoch, self.step))

    def as_metrics(self) -> dict[str, float]:
        # The worst values of the usual metrics go along: Tune's searcher and scheduler need
        # the study metric in every result, and the trial is failed right after.
        return {
            **DIVERGED_WORST,
            DIVERGED_KEY: 1.0,
            "diverged/epoch": self.epoch,
            "diverged/step": self.step,
        }

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None) -> Diverged | None:
        if not metrics or not metrics.get(DIVERGED_KEY):
            return None
        return cls(int(metrics["diverged/epoch"]), int(metrics["diverged/step"]))


# Errors that code raises on a bad value: a restart from a checkpoint runs the same code on the
# same config and data and raises them again. Anything else (a killed worker, a lost node, a
# collective torn down with it, an OSError) may pass on a restart.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
)


class DeterministicFailure(RuntimeError):
    """A training worker raised one of DETERMINISTIC_ERRORS: the run fails at once, without
    Ray Train's restarts (`cbtlab.train.retries`), and says which rank raised what."""

    def __init__(self, rank: int, error_type: str, message: str) -> None:
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        super().__init__(
            f"rank {rank} raised {error_type}: {first_line} (a bad value, raised again by any "
            "restart: not retried)"
        )
        self.rank, self.error_type, self.message = rank, error_type, message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rank, self.error_type, self.message))

    @classmethod
    def from_worker_errors(cls, errors: dict[int, BaseException]) -> DeterministicFailure | None:
        """The lowest rank's deterministic error among the workers' errors, or None (a crash).

        Ray Train hands a worker's own exception over wrapped (its UserExceptionWithTraceback
        keeps it as `_base_exc`); a dead worker's error is Ray's own, never one of these."""
        for rank in sorted(errors):
            error = getattr(errors[rank], "_base_exc", errors[rank])
            if isinstance(error, DETERMINISTIC_ERRORS):
                return cls(rank, type(error).__name__, str(error))
        return None
