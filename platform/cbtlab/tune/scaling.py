"""Model scaling (the paper's Table 3): CBT-T/S/B/L pre-trained, then fine-tuned downstream.

Two stages, each an ordinary grid study: pre-training, one cell per size (width, depth, heads);
then one fine-tuning study per downstream dataset (prebuilt shards), each size from its own
pre-trained checkpoint (the first seed's) with a new head, with the same seeds. Here: the
sizes' cells, the fine-tuning configs, the sizes' costs and the scaling table (per size its
parameters, FLOPs per image, and top-1 mean ± 95% CI over seeds per stage).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cbtlab.analysis.flops import count_flops
from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.data import open_split
from cbtlab.data.transforms import image_stats
from cbtlab.models import build_model
from cbtlab.models.zoo import SIZES
from cbtlab.tables import render_table
from cbtlab.tracking.schema import CHECKPOINT_TAG
from cbtlab.tune.stats import mean_ci

SIZE_KEYS = ("model.embed_dim", "model.depth", "model.num_heads")
SIZE_NAMES = ("tiny", "small", "base", "large")
# `imagenet` takes the registered cbt_*_patch16_224 sizes (cbtlab.models.zoo.SIZES); `smoke`
# the same proportions on the digits skeleton (head width 16, depth 4, 8 for L), so that the
# whole ladder trains on a CPU in minutes.
SMOKE_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (48, 4, 3),
    "small": (96, 4, 6),
    "base": (192, 4, 12),
    "large": (256, 8, 16),
}
# `imagenet`: the reference code's finetune.py (AdamW, lr 1e-4, batch 50, cosine over 400 epochs
# without warm-up, RandAugment(2, 14), evaluation on the centre at crop_pct 1.0); `smoke`: the
# digits recipe at a quarter of its learning rate without warm-up.
FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "smoke": {"train.lr": 1.25e-3, "train.warmup_epochs": 0.0},
    "imagenet": {
        "train.optimizer": "adamw",
        "train.lr": 1e-4,
        "train.weight_decay": 0.01,
        "data.batch_size": 50,
        "train.epochs": 400,
        "train.warmup_epochs": 0.0,
        "train.min_lr_ratio": 0.0,
        "train.label_smoothing": 0.0,
        "train.grad_clip": 0.0,
        "data.augment": "imagenet",
        "data.auto_augment": "rand-m14-n2",
        "data.crop_pct": 1.0,
    },
}


def size_cells(preset: str, sizes: Sequence[str]) -> list[dict[str, Any]]:
    """The grid cells (width, depth, heads) of the named sizes for a preset."""
    unknown = [s for s in sizes if s not in SIZE_NAMES]
    if unknown or not sizes:
        raise ConfigError("--sizes", f"{unknown or 'none'}: expected some of {SIZE_NAMES}")
    if preset == "imagenet":
        table = {n: (s["embed_dim"], s["depth"], s["num_heads"]) for n, s in SIZES.items()}
    else:
        table = SMOKE_SIZES
    return [dict(zip(SIZE_KEYS, table[name], strict=True)) for name in sizes]


def size_name(cell: Mapping[str, Any], names: Sequence[str], cells: Sequence[Mapping]) -> str:
    """The size name of a trial's cell (matched on width, depth and heads)."""
    key = tuple(cell[k] for k in SIZE_KEYS)
    for name, known in zip(names, cells, strict=True):
        if tuple(known[k] for k in SIZE_KEYS) == key:
            return name
    raise LookupError(f"no size has {dict(zip(SIZE_KEYS, key, strict=True))}")


def parse_downstream(items: Sequence[str]) -> dict[str, str]:
    """`NAME=ROOT` items -> {name: shard folder or URL}, names unique and plain."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, root = item.partition("=")
        name = name.strip()
        if not sep or not name or not root.strip():
            raise ConfigError(
                "--downstream", f"{item!r}: expected NAME=ROOT, e.g. cifar10=/data/c10"
            )
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("--downstream", f"{name!r}: use letters, digits, '-' and '_'")
        if name in out:
            raise ConfigError("--downstream", f"{name!r} is given twice")
        out[name] = root.strip()
    return out


def finetune_base(
    pretrain: ExperimentConfig, root: str, preset: str, overrides: Mapping[str, Any]
) -> ExperimentConfig:
    """The fine-tuning config on the shards at `root`: the pre-training's model and scaling,
    the dataset card's classes, the preset's fine-tuning recipe, then `overrides`. Raises
    ConfigError (naming the dataset) when its card cannot be read or its images have another
    number of channels than the pre-trained stem takes."""
    try:
        shardset = open_split(root, "train")
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError("--downstream", f"{root}: {exc}") from exc
    channels, _, _ = image_stats(shardset)
    if channels != pretrain.model.in_chans:
        raise ConfigError(
            "--downstream",
            f"{root} has {channels}-channel images; the pre-trained models take "
            f"{pretrain.model.in_chans}",
        )
    recipe = {
        "data.dataset": "shards",
        "data.root": root,
        "model.num_classes": shardset.num_classes,
        **FINETUNE_RECIPES[preset],
        **overrides,
    }
    return pretrain.with_overrides(recipe)


@dataclass
class ScalingRow:
    """One size of the scaling table: its model's cost and its top-1 values per stage."""

    size: str
    params: int
    flops: int
    # stage ("pretrain" or a downstream name) -> the trials' top-1 values (one per seed)
    top1: dict[str, list[float]]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "params": self.params, "flops": self.flops}
        for stage, values in self.top1.items():
            mean, std, low, high = mean_ci(values)
            out[stage] = {"values": values, "mean": mean, "std": std, "ci": [low, high]}
        return out


def model_cost(cfg: ExperimentConfig) -> tuple[int, int]:
    """(parameters, FLOPs of one forward pass of one image) of the config's model."""
    model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, cfg.model.img_size, in_chans=cfg.model.in_chans)
    return params, int(flops)


def _cell_value(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_scaling(rows: Sequence[ScalingRow], stages: Sequence[str]) -> str:
    """The scaling table: size, parameters, FLOPs, top-1 mean ± CI half-width per stage."""
    headers = ["size", "params (M)", "GFLOPs", *(f"{s} top-1" for s in stages)]
    body = []
    for row in rows:
        cells = [row.size, f"{row.params / 1e6:.3f}", f"{row.flops / 1e9:.3f}"]
        for stage in stages:
            values = row.top1.get(stage, [])
            mean, _, low, high = mean_ci(values)
            if not values:
                cells.append("-")
            elif math.isnan(low):
                cells.append(f"{_cell_value(mean)} (n={len(values)})")
            else:
                cells.append(f"{_cell_value(mean)} ± {(high - low) / 2:.4f} (n={len(values)})")
        body.append(cells)
    return render_table(headers, body)


def scaling_json(rows: Sequence[ScalingRow]) -> str:
    return json.dumps([row.as_dict() for row in rows], indent=2)


def pretrained_checkpoints(
    rows: Sequence[Mapping[str, Any]],
    tracking_uri: str,
    *,
    names: Sequence[str],
    cells: Sequence[Mapping[str, Any]],
    seed: int,
) -> dict[str, str]:
    """size -> the checkpoint of its finished pre-training trial with `seed` (the run's
    `cbtlab.checkpoint` tag); sizes whose trial failed are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = {}
    for row in rows:
        if row["train.seed"] != seed or row["status"] != "FINISHED":
            continue
        tags = client.get_run(row["run_id"]).data.tags
        if tags.get(CHECKPOINT_TAG):
            found[size_name(row, names, cells)] = tags[CHECKPOINT_TAG]
    return found


def scaling_rows(
    stage_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    names: Sequence[str],
    cells: Sequence[Mapping[str, Any]],
    pretrain: ExperimentConfig,
    stats_on: str,
) -> list[ScalingRow]:
    """The scaling table's rows from each stage's trial rows (finished trials only), each at
    its stage's budget (`at_budget`, set by the study's answer) where the rows have it."""
    out = []
    for name, cell in zip(names, cells, strict=True):
        params, flops = model_cost(pretrain.with_overrides(dict(cell)))
        top1: dict[str, list[float]] = {}
        for stage, rows in stage_rows.items():
            top1[stage] = [
                float(r.get("at_budget", r[stats_on]))
                for r in sorted(rows, key=lambda r: r["train.seed"])
                if r["status"] == "FINISHED"
                and r.get("at_budget", r[stats_on]) is not None
                and size_name(r, names, cells) == name
            ]
        out.append(ScalingRow(name, params, flops, top1))
    return out
