"""Datasets as WebDataset shards, and their loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cbtlab.config import DataConfig, ModelConfig
from cbtlab.data.checksums import ChecksumError
from cbtlab.data.digits import ensure_digits
from cbtlab.data.loader import ShardReadError, TrainEpoch, eval_batches
from cbtlab.data.remote import open_split
from cbtlab.data.segmentation import ensure_shapes
from cbtlab.data.shards import ShardSet, read_split
from cbtlab.data.transforms import Transforms, build_transforms, image_stats
from cbtlab.data.workers import LoaderWorkerError, WorkerPool
from cbtlab.paths import data_home

__all__ = [
    "ChecksumError",
    "LoaderWorkerError",
    "ShardReadError",
    "ShardSet",
    "TrainEpoch",
    "Transforms",
    "WorkerPool",
    "check_dataset_fits",
    "dataset_hash",
    "eval_batches",
    "open_split",
    "prepare_dataset",
    "read_split",
    "transforms_for",
]


def prepare_dataset(cfg: DataConfig) -> Path | str:
    """Make sure the configured dataset's shards exist; return their folder (or URL), for
    `open_split`."""
    if cfg.dataset == "shards":
        return cfg.root
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else data_home()
    if cfg.dataset == "digits":
        return ensure_digits(
            cache,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            samples_per_shard=cfg.samples_per_shard,
        )
    if cfg.dataset == "shapes":
        return ensure_shapes(cache, samples_per_shard=cfg.samples_per_shard, seed=cfg.split_seed)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def dataset_hash(cfg: DataConfig) -> str:
    """The content hash of a config's dataset (the tag `cbtlab.data_hash`). Builds a built-in
    dataset on first use, so that workers on this machine then find it cached."""
    return open_split(prepare_dataset(cfg), "train").content_hash


def transforms_for(
    cfg: DataConfig,
    img_size: int,
    shardset: ShardSet,
    stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Transforms:
    """The configured recipe, normalised with `stats` (mean, std): those of the weights the
    model starts from (timm's convention; `cbtlab.train.finetune.normalisation`), or where
    None, the dataset card's statistics."""
    mean, std = stats if stats is not None else image_stats(shardset)[1:]
    return build_transforms(
        img_size=img_size,
        mean=mean,
        std=std,
        augment=cfg.train_augment,
        crop_pct=cfg.eval_crop_pct,
        auto_augment=cfg.auto_augment,
    )


def check_dataset_fits(model: ModelConfig, shardset: ShardSet) -> None:
    """Raise ValueError if the model's input channels or classes differ from the dataset's."""
    channels, _, _ = image_stats(shardset)
    if channels != model.in_chans:
        raise ValueError(
            f"dataset {shardset.name!r} has {channels}-channel images; "
            f"set model.in_chans={channels}"
        )
    if shardset.num_classes != model.num_classes:
        raise ValueError(
            f"dataset {shardset.name!r} has {shardset.num_classes} classes; "
            f"set model.num_classes={shardset.num_classes}"
        )
