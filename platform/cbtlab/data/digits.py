"""The built-in dataset: scikit-learn's handwritten digits (1,797 real 8 x 8 scans, 10 classes).

It ships inside scikit-learn, so a study runs with no download. On first use it is written as
PNG images into WebDataset shards with a manifest and a card, under a cache folder keyed by the
split parameters; later runs, and every Ray worker on the machine, reuse those shards. A build
runs under a file lock into a temporary folder that is renamed into place, so concurrent first
uses and interrupted builds never leave a half-written dataset behind.
"""

from __future__ import annotations

import fcntl
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cbtlab.data.shards import Sample, ShardSet, read_split, write_card, write_split

log = logging.getLogger(__name__)

NAME = "digits"
FORMAT_VERSION = 1


def digits_dir(cache_dir: Path, val_fraction: float, split_seed: int, per_shard: int) -> Path:
    return cache_dir / f"{NAME}-v{FORMAT_VERSION}-val{val_fraction:g}-seed{split_seed}-n{per_shard}"


def ensure_digits(
    cache_dir: Path, *, val_fraction: float = 0.2, split_seed: int = 0, samples_per_shard: int = 128
) -> Path:
    """The folder holding the digits shards for these split parameters, built if needed.

    A cached copy whose shards are missing or changed size is rebuilt."""
    root = digits_dir(cache_dir, val_fraction, split_seed, samples_per_shard)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for split in ("train", "val"):
                read_split(root, split)
            return root
        except FileNotFoundError as exc:
            if root.exists():
                log.warning("rebuilding the digits cache at %s: %s", root, exc)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
        try:
            _build(tmp, val_fraction, split_seed, samples_per_shard)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_digits_split(root: Path, split: str) -> ShardSet:
    return read_split(root, split)


def _build(out: Path, val_fraction: float, split_seed: int, per_shard: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # The scans hold integers 0..16; scale to 8-bit grey levels for PNG.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=split_seed, stratify=labels
    )
    # Shuffle the training order across shards once, with the split seed.
    train_idx = np.random.default_rng(split_seed).permutation(train_idx)
    val_idx = np.sort(val_idx)

    def samples(idx: np.ndarray):
        for i in idx:
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            yield Sample(
                key=f"{NAME}-{i:05d}", image=buf.getvalue(), ext="png", label=int(labels[i])
            )

    train_shards, train_rows = write_split(samples(train_idx), out, "train", per_shard)
    val_shards, val_rows = write_split(samples(val_idx), out, "val", per_shard)
    train_pixels = images[train_idx].astype(np.float64) / 255.0
    write_card(
        out,
        NAME,
        {"train": train_shards, "val": val_shards},
        train_rows + val_rows,
        num_classes=10,
        image_ext="png",
        extra={
            "image_size": 8,
            "channels": 1,
            "mean": [float(train_pixels.mean())],
            "std": [float(train_pixels.std())],
            "val_fraction": val_fraction,
            "split_seed": split_seed,
            "source": "sklearn.datasets.load_digits",
        },
    )
