"""The loader checks samples against the manifest's sha256 as it reads them (data.checksums):
a corrupt but decodable image is counted and skipped, or stops the run, never trained on
unseen; each stream reads only its shard's rows of the manifest."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cbtlab.config import ExperimentConfig
from cbtlab.data import ShardSet, TrainEpoch, checksums, eval_batches, read_split
from cbtlab.data.checksums import (
    ChecksumError,
    _warn_unchecked,
    checksum_cost,
    read_shard_checksums,
    shard_ranges,
)
from cbtlab.data.shards import MANIFEST_NAME, Sample, write_card, write_split
from cbtlab.overrides import ConfigError

BAD_KEY = "p00013"  # the one sample of label 1, in train-00001.tar


def _photos(out: Path, count: int = 48, per_shard: int = 8) -> ShardSet:
    """Train and val splits of `count` 64 x 64 noisy JPEGs; label 1 only for `BAD_KEY` (and
    its val twin), 0 for the rest, so that a batch shows whether it holds that sample."""

    def samples(offset: int):
        for i in range(count):
            key = f"p{offset + i:05d}"
            yield Sample(key=key, image=_jpeg(offset + i), ext="jpg", label=int(i == 13))

    out.mkdir(parents=True, exist_ok=True)
    train, train_rows = write_split(samples(0), out, "train", per_shard)
    val, val_rows = write_split(samples(1_000), out, "val", per_shard)
    write_card(
        out,
        "photos",
        {"train": train, "val": val},
        train_rows + val_rows,
        num_classes=2,
        image_ext="jpg",
        extra={"channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
    )
    return read_split(out, "train")


def _jpeg(seed: int, size: int = 64) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(noise.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _zero_64_bytes(shard: Path, key: str) -> bytes:
    """Zero 64 bytes inside `key`'s JPEG in the tar, in place (the shard keeps its size);
    returns the damaged image, which still decodes."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.jpg")
    start = member.offset_data + member.size // 2  # inside the entropy-coded scan
    data = bytearray(shard.read_bytes())
    data[start : start + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    image = bytes(data[member.offset_data : member.offset_data + member.size])
    Image.open(io.BytesIO(image)).load()  # decodable: only the checksum can tell
    return image


def _mean(img: Image.Image) -> torch.Tensor:
    return torch.tensor([float(np.asarray(img).mean())])


def _train(shardset: ShardSet, **kw) -> TrainEpoch:
    args = {"seed": 0, "batch_size": 8, "shuffle_buffer": 16, "transform": _mean, **kw}
    return TrainEpoch(shardset, rank=0, world_size=1, epoch=0, **args)


def _labels(loader) -> list[int]:
    return [int(label) for _, labels in loader for label in labels]


@pytest.fixture
def damaged(tmp_path: Path) -> ShardSet:
    shardset = _photos(tmp_path)
    _zero_64_bytes(tmp_path / "train-00001.tar", BAD_KEY)
    _zero_64_bytes(tmp_path / "val-00001.tar", "p01013")
    return shardset


def test_a_zeroed_but_decodable_jpeg_is_counted_and_skipped(
    damaged: ShardSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for workers in (0, 2):
        loader = _train(damaged, loader_workers=workers)
        labels = _labels(loader)
        assert loader.corrupt_samples == 1 and 1 not in labels
        assert len(labels) == len(loader) * 8  # topped up: still every planned batch
    assert f"skipping corrupt sample {BAD_KEY} in {tmp_path / 'train-00001.tar'}" in caplog.text
    val = eval_batches(
        read_split(tmp_path, "val"), rank=0, world_size=1, batch_size=8, transform=_mean
    )
    assert len(_labels(val)) == 47 and val.corrupt_samples == 1


def test_stop_names_the_shard_and_the_key(damaged: ShardSet, tmp_path: Path) -> None:
    shard = tmp_path / "train-00001.tar"
    for workers in (0, 2):  # from a loader worker, raised as itself
        with pytest.raises(ChecksumError, match=f"{BAD_KEY} of shard {shard}"):
            _labels(_train(damaged, loader_workers=workers, checksums="stop"))


def test_off_trains_on_the_damaged_image_unseen(damaged: ShardSet) -> None:
    # The trade-off "off" makes: no hashing, and the corrupt image is a training sample.
    loader = _train(damaged, checksums="off", batch_size=6)
    assert loader.corrupt_samples == 0 and 1 in _labels(loader)


def test_an_intact_dataset_has_no_corrupt_samples(tmp_path: Path) -> None:
    loader = _train(_photos(tmp_path), checksums="stop", loader_workers=2)
    assert len(_labels(loader)) == 48 and loader.corrupt_samples == 0


def test_a_stream_reads_only_its_shards_rows_of_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _photos(tmp_path)  # 6 + 6 shards of 8
    manifest = tmp_path / MANIFEST_NAME
    assert pq.ParquetFile(manifest).metadata.num_row_groups == 12  # one per shard
    table = pq.read_table(manifest)
    read: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw),
    )
    rows = read_shard_checksums(str(manifest), "train-00001.tar")
    assert read == [[1]]
    assert rows == {
        key: sha
        for key, shard, sha in zip(
            *(table.column(c).to_pylist() for c in ("key", "shard", "sha256")), strict=True
        )
        if shard == "train-00001.tar"
    }
    assert len(rows) == 8 and BAD_KEY in rows
    # Each row group's statistics name one shard: a stream reads the row group of its shard.
    ranges = shard_ranges(pq.ParquetFile(manifest).metadata)
    assert ranges[:2] == [("train-00000.tar",) * 2, ("train-00001.tar",) * 2]
    # An older manifest, one row group for all: the same rows, read whole and filtered.
    pq.write_table(table, manifest)
    assert pq.ParquetFile(manifest).metadata.num_row_groups == 1
    assert read_shard_checksums(str(manifest), "train-00001.tar") == rows
    assert read_shard_checksums(str(manifest), "train-09999.tar") == {}
    monkeypatch.setattr(checksums, "SMALL_MANIFEST", 10)  # as if ImageNet's: filtered by Arrow
    assert read_shard_checksums(str(manifest), "train-00001.tar") == rows


def test_without_a_manifest_skip_reads_unchecked_and_stop_refuses(
    damaged: ShardSet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / MANIFEST_NAME).unlink()
    _warn_unchecked.cache_clear()  # logged once per dataset and process
    shardset = read_split(tmp_path, "train")
    assert shardset.manifest is None
    with caplog.at_level(logging.WARNING):
        assert _train(shardset).corrupt_samples == 0
    assert "no manifest" in caplog.text
    with pytest.raises(ChecksumError, match="has no manifest"):
        _train(shardset, checksums="stop")


def test_the_policy_is_a_checked_config_field() -> None:
    assert ExperimentConfig().data.checksums == "skip"
    with pytest.raises(ConfigError, match=r"data\.checksums"):
        ExperimentConfig().with_overrides({"data.checksums": "maybe"})


def test_checksum_cost_is_measured_per_image() -> None:
    cost = checksum_cost([_jpeg(i) for i in range(8)], repeat=1)
    assert 0 < cost < 50  # milliseconds per image


def test_a_corrupt_sample_reaches_the_training_metrics(damaged: ShardSet, tmp_path: Path) -> None:
    cfg = ExperimentConfig().with_overrides(
        {
            "data.dataset": "shards",
            "data.root": str(tmp_path),
            "data.augment": "none",
            "data.batch_size": 8,
            "model.img_size": 16,
            "model.patch_size": 8,
            "model.in_chans": 3,
            "model.num_classes": 2,
            "model.embed_dim": 24,
            "model.depth": 1,
            "model.num_heads": 3,
            "model.rep_grid": "1x1",
            "train.epochs": 1,
            "train.num_workers": 1,
        }
    )
    from cbtlab.train import run_training

    reports: list[dict[str, float]] = []
    run_training(cfg, report=lambda metrics, state: reports.append(metrics))
    assert reports[0]["data/corrupt_samples"] == 1 and reports[0]["val/corrupt_samples"] == 1
    with pytest.raises(ChecksumError, match=BAD_KEY):
        run_training(cfg.with_overrides({"data.checksums": "stop"}), report=lambda m, s: None)
