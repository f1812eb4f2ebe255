"""Datasets as WebDataset shards, and their loaders."""

from __future__ import annotations

from pathlib import Path

from cbtlab.config import DataConfig
from cbtlab.data.digits import ensure_digits
from cbtlab.data.loader import TrainEpoch, eval_batches
from cbtlab.data.shards import ShardSet, read_split
from cbtlab.paths import data_home

__all__ = ["ShardSet", "TrainEpoch", "eval_batches", "prepare_dataset", "read_split"]


def prepare_dataset(cfg: DataConfig) -> Path:
    """Make sure the configured dataset's shards exist; return their folder."""
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else data_home()
    if cfg.dataset == "digits":
        return ensure_digits(
            cache,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            samples_per_shard=cfg.samples_per_shard,
        )
    raise ValueError(f"unknown dataset {cfg.dataset!r}")
