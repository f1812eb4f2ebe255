"""Training: the worker loop (plain PyTorch) and its Ray Train trainer.

The names below are imported on first use: importing a submodule alone (`cbtlab.train.recipe`,
the optimizer step the throughput benchmark times) must not bring in the worker loop's data
layer (webdataset) or the trainer's Ray, which a bare GPU machine lacks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbtlab.train.loop import run_training, train_loop_per_worker
    from cbtlab.train.messages import Diverged
    from cbtlab.train.trainer import build_trainer, fit

# Each public name and the submodule that defines it.
_HOMES = {
    "Diverged": "messages",
    "build_trainer": "trainer",
    "fit": "trainer",
    "run_training": "loop",
    "train_loop_per_worker": "loop",
}

__all__ = ["Diverged", "build_trainer", "fit", "run_training", "train_loop_per_worker"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
