"""What the workers tell the driver through their reported metrics: a divergence (`Diverged`,
whose metrics carry DIVERGED_KEY and the worst values DIVERGED_WORST) and a mid-epoch
checkpoint (metrics carrying MID_EPOCH_KEY). The worker loop writes them; the trainer's `fit`
and the driver's callbacks read them."""

from __future__ import annotations

import math
from typing import Any

MID_EPOCH_KEY = "checkpoint/mid_epoch"
DIVERGED_KEY = "train/diverged"
DIVERGED_WORST = {"val/top1": 0.0, "val/top5": 0.0, "val/loss": math.inf, "train/loss": math.inf}


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite on some rank (raised on every rank alike, at
    most `DivergenceGuard.every - 1` micro-batches later: see `cbtlab.train.metrics`).

    It travels from the workers to the driver as a result: `as_metrics()` in the workers'
    last report, `from_metrics()` where that report arrives (the trial, the MLflow callback).
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite training loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step

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
