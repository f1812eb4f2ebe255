"""The digits shards and the rank-aware WebDataset loader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cbtlab.data import ShardSet, TrainEpoch, eval_batches, read_split
from cbtlab.data.digits import ensure_digits
from cbtlab.data.shards import Sample, write_card, write_split


def _keys_transform(image: object) -> torch.Tensor:
    return torch.zeros(1)


def test_manifest_matches_the_shards(digits_root: Path) -> None:
    manifest = pq.read_table(digits_root / "manifest.parquet").to_pylist()
    assert len(manifest) == 1797
    assert {r["split"] for r in manifest} == {"train", "val"}
    train_keys = {r["key"] for r in manifest if r["split"] == "train"}
    val_keys = {r["key"] for r in manifest if r["split"] == "val"}
    assert len(val_keys) == 360 and not train_keys & val_keys
    by_key = {r["key"]: r for r in manifest}
    seen = 0
    for shard in sorted(digits_root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                row = by_key[key]
                assert row["shard"] == shard.name
                data = tar.extractfile(member).read()
                if ext == "png":
                    assert hashlib.sha256(data).hexdigest() == row["sha256"]
                    seen += 1
                else:
                    assert int(data) == row["label"]
    assert seen == 1797
    card = json.loads((digits_root / "card.json").read_text())
    assert sum(card["class_counts"]["val"]) == 360
    assert min(card["class_counts"]["val"]) >= 34  # stratified: every class in validation


def test_cache_is_reused_and_a_damaged_shard_is_rebuilt(tmp_path: Path) -> None:
    root = ensure_digits(tmp_path, samples_per_shard=400)
    shard = root / "train-00000.tar"
    stamp = shard.stat().st_mtime_ns
    assert ensure_digits(tmp_path, samples_per_shard=400) == root
    assert shard.stat().st_mtime_ns == stamp  # reused, not rewritten
    original = shard.read_bytes()
    shard.write_bytes(original[:1000])  # truncated
    with pytest.raises(FileNotFoundError, match="bytes"):
        read_split(root, "train")
    ensure_digits(tmp_path, samples_per_shard=400)
    assert shard.read_bytes() == original  # rebuilt identically (deterministic build)


def _numbered_shards(out: Path, count: int, per_shard: int) -> ShardSet:
    """Shards of `count` 8 x 8 images whose first two pixels spell the sample's number."""

    def samples():
        for i in range(count):
            pixels = np.zeros((8, 8), dtype=np.uint8)
            pixels[0, 0], pixels[0, 1] = divmod(i, 256)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            yield Sample(key=f"s{i:05d}", image=buf.getvalue(), ext="png", label=i % 10)

    shards, rows = write_split(samples(), out, "train", per_shard)
    write_card(
        out,
        "numbered",
        {"train": shards},
        rows,
        num_classes=10,
        image_ext="png",
        extra={"channels": 1},
    )
    return read_split(out, "train")


def _number(img: Image.Image) -> torch.Tensor:
    high, low = img.getpixel((0, 0)), img.getpixel((1, 0))
    return torch.tensor(high * 256 + low)


def _epoch_numbers(shardset: ShardSet, rank: int, world: int, epoch: int, batch: int) -> list[int]:
    loader = TrainEpoch(
        shardset,
        rank=rank,
        world_size=world,
        epoch=epoch,
        seed=0,
        batch_size=batch,
        shuffle_buffer=16,
        transform=_number,
    )
    batches = [numbers for numbers, _ in loader]
    assert len(batches) == len(loader)
    assert all(len(b) == batch for b in batches)
    return [int(n) for b in batches for n in b]


def test_ranks_get_equal_batches_and_disjoint_samples(tmp_path: Path) -> None:
    shardset = _numbered_shards(tmp_path, count=230, per_shard=23)  # 10 shards
    for epoch in range(3):
        per_rank = [_epoch_numbers(shardset, r, 2, epoch, batch=16) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == 16 * (115 // 16)
        seen = per_rank[0] + per_rank[1]
        assert len(set(seen)) == len(seen)  # no sample twice in an epoch
    # Uneven shards: 3 ranks hold 4, 3 and 3 shards; all ranks still yield the same count.
    per_rank = [_epoch_numbers(shardset, r, 3, 0, batch=8) for r in range(3)]
    assert len({len(n) for n in per_rank}) == 1
    everything = [n for numbers in per_rank for n in numbers]
    assert len(set(everything)) == len(everything)


def test_order_is_seeded_per_epoch(tmp_path: Path) -> None:
    shardset = _numbered_shards(tmp_path, count=230, per_shard=23)
    first = _epoch_numbers(shardset, 0, 2, epoch=0, batch=16)
    assert first == _epoch_numbers(shardset, 0, 2, epoch=0, batch=16)
    assert first != _epoch_numbers(shardset, 0, 2, epoch=1, batch=16)


def test_validation_sees_every_sample_once(digits_root: Path) -> None:
    val = read_split(digits_root, "val")
    labels = []
    for rank in range(2):
        for _, y in eval_batches(
            val, rank=rank, world_size=2, batch_size=50, transform=_keys_transform
        ):
            labels.append(y)
    labels = torch.cat(labels)
    assert labels.numel() == val.num_samples == 360
    expected = json.loads((digits_root / "card.json").read_text())["class_counts"]["val"]
    assert torch.bincount(labels, minlength=10).tolist() == expected


def test_too_many_ranks_is_a_clear_error_in_training_not_in_evaluation(
    digits_root: Path,
) -> None:
    val = read_split(digits_root, "val")  # 3 shards
    with pytest.raises(ValueError, match="cannot give each of 8 ranks"):
        TrainEpoch(
            val,
            rank=0,
            world_size=8,
            epoch=0,
            seed=0,
            batch_size=8,
            shuffle_buffer=8,
            transform=_keys_transform,
        )
    # Evaluation: ranks beyond the shard count evaluate nothing; every sample still once.
    per_rank = [
        sum(
            len(y)
            for _, y in eval_batches(
                val, rank=r, world_size=8, batch_size=64, transform=_keys_transform
            )
        )
        for r in range(8)
    ]
    assert sum(per_rank) == 360 and per_rank[3:] == [0] * 5
