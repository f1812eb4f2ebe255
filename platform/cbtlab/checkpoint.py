"""Training checkpoints: what is saved, how it is loaded, and what makes one incompatible.

A checkpoint holds everything an epoch boundary needs to continue exactly: the model, the
optimiser and the schedule, the number of finished epochs, the metrics of the last one, the
model config it was made with, and the normalisation its images had (`data_config`: mean and
std, as timm's data configs name them; what a fine-tune from it normalises with). Data order
and augmentation are seeded from (seed, epoch, rank) at the start of every epoch, so resuming
at an epoch boundary replays the same batches and the same random augmentations as an
uninterrupted run. Loading uses `torch.load(weights_only=True)`.

A mid-epoch checkpoint (`train.checkpoint_every_steps`) adds the data position: the batches of
the unfinished epoch already trained on, and for every rank its random generators (Python,
NumPy, torch, CUDA) and its partial metric sums. An epoch's batches on a rank depend only on
(seed, epoch, rank, world size, loader workers, batch size), so the resumed run rebuilds the
epoch, skips those batches by reading them (decoding and transforming included: it replays the
augmentations' random draws, which the cheap way of skipping would change), then restores the
generators, and goes on exactly as the uninterrupted run did.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    normalisation: tuple[Sequence[float], Sequence[float]],
    history: Sequence[Mapping[str, Any]] = (),
    position: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint after `epoch` finished epochs of images normalised with
    `normalisation` (mean, std), whose metrics were `history` (one per finished epoch);
    `position` (from `data_position`) marks a mid-epoch one."""
    return snapshot(
        {
            "format": FORMAT,
            "epochs_done": epoch,
            "model_config": {k: v for k, v in cfg.flat().items() if k.startswith("model.")},
            "seed": cfg.train.seed,
            "data_config": {"mean": list(normalisation[0]), "std": list(normalisation[1])},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            # A loss scaler's state would go here; bf16 and fp32 need none (no fp16 offered).
            "scaler": None,
            "metrics": dict(metrics),
            "history": [dict(m) for m in history],
            "position": position,
        }
    )


def finished_epochs(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The metrics of every epoch a checkpoint's run finished, in order. A checkpoint made
    before they were recorded gives its own epoch's (an epoch-end one) or none (mid-epoch)."""
    if "history" in state:
        return [dict(m) for m in state["history"]]
    if state.get("position") or not state.get("metrics"):
        return []
    return [dict(state["metrics"])]


def recorded_normalisation(state: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """The (mean, std) a checkpoint's images were normalised with; None for a checkpoint made
    before they were recorded."""
    data_config = state.get("data_config")
    if not data_config:
        return None
    return list(data_config["mean"]), list(data_config["std"])


def snapshot(obj: Any) -> Any:
    """A copy of `obj` whose tensors are on the CPU: state_dict() returns the live tensors,
    which training keeps updating, and copying them where they live would double the model's
    and the optimiser's memory on a GPU. Other values are deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):  # a shallow copy first keeps a state_dict's `_metadata`
        copied = copy.copy(obj)
        for key, value in obj.items():
            copied[key] = snapshot(value)
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return copy.deepcopy(obj)


def data_position(
    cfg: ExperimentConfig, *, world_size: int, batches_done: int, ranks: list[dict[str, Any]]
) -> dict[str, Any]:
    """Where in the unfinished epoch a mid-epoch checkpoint stands: `batches_done` training
    batches (micro-batches) on every rank, each rank's `ranks[r]` (`rng_state`, metric sums),
    and what the epoch's batches depend on."""
    return {
        "batches_done": batches_done,
        "ranks": ranks,
        "stream": _stream_key(cfg, world_size),
    }


def _stream_key(cfg: ExperimentConfig, world_size: int) -> dict[str, int]:
    return {
        "train.num_workers": world_size,
        "data.batch_size": cfg.data.batch_size,
        "data.loader_workers": cfg.data.loader_workers,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "train.seed": cfg.train.seed,
    }


def check_position(state: dict[str, Any], cfg: ExperimentConfig, world_size: int) -> None:
    """A mid-epoch checkpoint continues only with the data stream it was made on."""
    position = state.get("position")
    if not position:
        return
    ours = _stream_key(cfg, world_size)
    for key, value in position["stream"].items():
        if ours.get(key) != value:
            raise CheckpointError(
                f"the checkpoint stopped mid-epoch with {key}={value!r}, this run has "
                f"{ours.get(key)!r}; a mid-epoch position continues only on the same data stream"
            )


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, in types `torch.load(weights_only=True)` reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    keys, pos, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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
