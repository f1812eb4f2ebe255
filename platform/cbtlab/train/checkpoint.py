"""Training checkpoints: what is saved, how it is loaded, and what makes one incompatible.

A checkpoint holds everything an epoch boundary needs to continue exactly: the model, the
optimiser and the schedule, the number of finished epochs, the metrics of the last one, and the
model config it was made with. Data order and augmentation are seeded from (seed, epoch, rank)
at the start of every epoch, so resuming at an epoch boundary replays the same batches and the
same random augmentations as an uninterrupted run. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from cbtlab.config import ExperimentConfig

FORMAT = 1
STATE_FILE = "state.pt"
DIVERGED_FILE = "diverged.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this run (other format, other model)."""


def make_state(
    cfg: ExperimentConfig,
    *,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    metrics: dict[str, float],
) -> dict[str, Any]:
    # A snapshot: state_dict() returns the live tensors, which training keeps updating.
    return copy.deepcopy(
        {
            "format": FORMAT,
            "epochs_done": epoch,
            "model_config": {k: v for k, v in cfg.flat().items() if k.startswith("model.")},
            "seed": cfg.train.seed,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "metrics": dict(metrics),
        }
    )


def save_state(state: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def mark_diverged(directory: Path, reason: str) -> None:
    """The checkpoint a diverged run ends with: no state, only the reason."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DIVERGED_FILE).write_text(reason)


def load_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    marker = Path(directory) / DIVERGED_FILE
    if marker.is_file():
        raise CheckpointError(f"{directory} marks a diverged run: {marker.read_text()}")
    if not path.is_file():
        raise CheckpointError(f"no {STATE_FILE} in checkpoint {directory}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cbtlab checkpoint of format {FORMAT}")
    return state


def check_compatible(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Raise CheckpointError naming the first model field that differs."""
    ours = {k: v for k, v in cfg.flat().items() if k.startswith("model.")}
    for key, value in state["model_config"].items():
        if ours.get(key) != value:
            raise CheckpointError(
                f"the checkpoint was made with {key}={value!r}, this run has {ours.get(key)!r}"
            )
    if state["epochs_done"] > cfg.train.epochs:
        raise CheckpointError(
            f"the checkpoint has {state['epochs_done']} epochs done, more than "
            f"train.epochs={cfg.train.epochs}"
        )
