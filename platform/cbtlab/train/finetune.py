"""Fine-tuning: start a model from other weights (`train.init_from`).

The weights come from a cbtlab checkpoint (a checkpoint folder or its `state.pt`), a bare
state dict of our models, or the authors' reference checkpoint (`{'state_dict': ...}` in the
reference layout, renamed by `cbtlab.models.reference`). Everything but the classifier loads
into the model as it is, with two exceptions: the position embedding is resampled (bicubic, as
the model does for other input sizes) when `model.img_size` gives another patch grid, and the
head (`head.*`) is kept fresh when its shape differs (another `model.num_classes`). Any other
missing, extra or differently shaped tensor is refused, naming it. The reference checkpoints'
(K, 1, 1) step sizes are reshaped to ours.

A fine-tune normalises its images as the starting weights were trained (timm's convention: the
pretrained model's data config, not the new dataset's statistics): a cbtlab checkpoint's
recorded mean and std, the authors' checkpoints the zoo's `pretrained_cfg` (ImageNet's). Where
the weights do not say (a bare state dict, a checkpoint older than the record), the dataset
card's statistics, as before.

With `model.adapt_from` (a timm ViT adapted to `model.attention`, `cbtlab.models.adapt`), the
file may instead be that ViT's timm weights (.safetensors, .pth, .bin or big_vision's .npz):
timm loads them (a new head for another class count, the position embedding resampled, the
first convolution fitted to `model.in_chans`), the adapter maps them to our names, and the
run normalises as the ViT was trained (its pretrained config's mean and std). A cbtlab
checkpoint of an adapted model loads as any other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cbtlab.checkpoint import FORMAT, STATE_FILE, CheckpointError, recorded_normalisation
from cbtlab.config import ExperimentConfig
from cbtlab.models import build_model, zoo
from cbtlab.models.adapt import convert_vit_state_dict, load_vit, vit_normalisation
from cbtlab.models.reference import (
    convert_reference_state_dict,
    is_reference_layout,
    unwrap_checkpoint,
)
from cbtlab.models.transformer import resample_pos_embed
from cbtlab.train.recipe import HEAD_PREFIX

log = logging.getLogger(__name__)


Normalisation = tuple[list[float], list[float]]  # (mean, std), one value per channel


@dataclass(frozen=True)
class StartingWeights:
    """The weights a fine-tune starts from, under our names, and the (mean, std) they were
    trained with (None where the weights do not say)."""

    weights: dict[str, Tensor]
    normalisation: Normalisation | None


def read_weights(path: str | Path, model: Any = None) -> dict[str, Tensor]:
    """The model weights of `path`, under our parameter names (see the module docstring)."""
    return read_start(path, model).weights


def read_start(path: str | Path, model: Any = None) -> StartingWeights:
    """The weights of `path` and their normalisation (see the module docstring). A URI
    (s3://, gs://, ...: a checkpoint a study wrote to cluster storage) is fetched first.
    `model`: the run's model config, read for `adapt_from` (a timm ViT's weights file)."""
    if getattr(model, "adapt_from", "") and _is_vit_file(path):
        return read_vit_start(model, path)
    if "://" in str(path):
        from ray.train import Checkpoint

        try:
            path = Checkpoint(str(path)).to_directory()
        except Exception as exc:
            raise CheckpointError(f"train.init_from: cannot fetch {path}: {exc}") from exc
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"train.init_from: no such checkpoint file {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or a damaged file
        raise CheckpointError(
            f"train.init_from: cannot read {path} with weights_only=True ({exc}); "
            "save its state dict alone (torch.save(model.state_dict(), ...))"
        ) from exc
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"train.init_from: {path} holds no state dict")
    if raw.get("format") == FORMAT and "model" in raw:  # a cbtlab checkpoint
        return StartingWeights(dict(raw["model"]), recorded_normalisation(raw))
    state = unwrap_checkpoint(raw)
    if is_reference_layout(state):
        try:
            weights = convert_reference_state_dict(state)
        except KeyError as exc:
            raise CheckpointError(f"train.init_from: {path}: {exc.args[0]}") from None
        return StartingWeights(weights, (list(zoo.CFG["mean"]), list(zoo.CFG["std"])))
    return StartingWeights({k: v for k, v in state.items() if isinstance(v, Tensor)}, None)


def _is_vit_file(path: str | Path) -> bool:
    """Whether `path` is a timm ViT's weights file rather than a cbtlab checkpoint (a folder,
    a state.pt with the cbtlab format, or a URI a study wrote)."""
    if "://" in str(path):
        if Path(str(path)).suffix in (".safetensors", ".npz", ".bin", ".pth"):
            raise CheckpointError(
                f"train.init_from: {path}: a timm ViT's weights are read from a path every "
                "worker sees (a shared file system), not a URI"
            )
        return False
    path = Path(path).expanduser()
    if path.is_dir():
        return False
    if path.suffix in (".safetensors", ".npz") or not path.is_file():
        return True  # (load_vit names a missing file)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return True  # timm's reader says what is wrong with it
    return not (isinstance(raw, Mapping) and raw.get("format") == FORMAT)


def read_vit_start(model: Any, path: str | Path) -> StartingWeights:
    """The starting weights of an adapted ViT (model config `model`, with `adapt_from`) from
    the timm ViT weights at `path`: every tensor of `build_model(model)`, the ViT's where they
    map (`cbtlab.models.adapt`), the rest as the model initialises them."""
    try:
        vit = load_vit(
            model.adapt_from,
            path,
            num_classes=model.num_classes,
            img_size=model.img_size,
            in_chans=model.in_chans,
        )
        weights = convert_vit_state_dict(vit.state_dict(), build_model(model).state_dict())
    except ValueError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    return StartingWeights(weights, vit_normalisation(vit, model.in_chans))


def load_backbone(model: nn.Module, weights: Mapping[str, Tensor]) -> list[str]:
    """Load `weights` into `model` (see the module docstring); returns notes on what was
    adapted (a new head, a resampled position embedding) for the log."""
    target = model.state_dict()
    extra = sorted(set(weights) - set(target))
    missing = sorted(set(target) - set(weights))
    if extra or missing:
        what = f"has {extra[0]!r}, which the model lacks" if extra else f"lacks {missing[0]!r}"
        raise CheckpointError(
            f"train.init_from: the checkpoint {what} ({len(extra)} extra, {len(missing)} "
            "missing tensors): is it for this model.attention / depth / stem / block?"
        )
    merged, notes = {}, []
    for key, ours in target.items():
        theirs = weights[key]
        if theirs.shape == ours.shape:
            merged[key] = theirs
        elif key.startswith(HEAD_PREFIX):
            merged[key] = ours
            if key.endswith("weight"):
                notes.append(
                    f"a new head: {ours.shape[0]} classes (the checkpoint's has {theirs.shape[0]})"
                )
        elif key == "pos_embed" and theirs.shape[-1] == ours.shape[-1]:
            merged[key] = resample_pos_embed(theirs, _grid(theirs, key), _grid(ours, key))
            notes.append(
                f"the position embedding resampled from a {_grid(theirs, key)} patch grid "
                f"to {_grid(ours, key)}"
            )
        elif key.endswith(("step_x", "step_rep")) and theirs.numel() == ours.numel():
            merged[key] = theirs.reshape(ours.shape)  # the reference stores (K, 1, 1)
        else:
            raise CheckpointError(
                f"train.init_from: {key} has shape {tuple(theirs.shape)} in the checkpoint, "
                f"{tuple(ours.shape)} in the model; only the head and the position embedding "
                "may differ"
            )
    with torch.no_grad():
        model.load_state_dict(merged, strict=True)
    return notes


def init_from(model: nn.Module, path: str | Path, model_cfg: Any = None) -> list[str]:
    """Start `model` from the weights at `path` (`model_cfg`: its config, for a timm ViT's
    weights, see `read_start`); returns what was adapted."""
    return load_backbone(model, read_weights(path, model_cfg))


def normalisation(
    cfg: ExperimentConfig, start: StartingWeights | None, resume: Mapping[str, Any] | None
) -> Normalisation | None:
    """The (mean, std) a run normalises with where the weights decide it: a resumed run's
    recorded one (it continues as it began), else the starting weights'; None: the dataset
    card's statistics (`cbtlab.data.transforms_for`)."""
    stats = recorded_normalisation(resume) if resume is not None else None
    if stats is None and start is not None:
        stats = start.normalisation
    if stats is not None and not len(stats[0]) == len(stats[1]) == cfg.model.in_chans:
        raise CheckpointError(
            f"train.init_from: the weights were trained on {len(stats[0])}-channel images "
            f"(mean {stats[0]}), model.in_chans is {cfg.model.in_chans}"
        )
    return stats


def _grid(pos_embed: Tensor, key: str) -> tuple[int, int]:
    """The square patch grid of a (1, 1 + H*W, d) position embedding (one CLS token)."""
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise CheckpointError(f"train.init_from: {key} holds {patches} patches, not a square grid")
    return (side, side)
