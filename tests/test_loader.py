"""The training-side loader: ranks x DataLoader workers, corrupt samples, errors, transforms,
reading shards in the tar formats and compressions writers produce."""

from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cbtlab.config import ExperimentConfig
from cbtlab.data import (
    LoaderWorkerError,
    ShardReadError,
    ShardSet,
    TrainEpoch,
    WorkerPool,
    eval_batches,
    open_split,
    read_split,
)
from cbtlab.data.loader import _read_shard, plan_train_epoch
from cbtlab.data.shards import Sample, ShardInfo, write_card, write_split
from cbtlab.data.transforms import SplitTransform, build_transforms
from cbtlab.data.workers import RemoteTraceback, default_start_method

CORRUPT = b"\x89PNG\r\n\x1a\n but not really"


def _numbered(
    out: Path, count: int, per_shard: int, *, corrupt: frozenset[int] = frozenset()
) -> ShardSet:
    """Train and val splits of `count` 8 x 8 PNGs whose first two pixels spell their number;
    the numbers in `corrupt` get bytes that no decoder reads."""

    def samples(offset: int):
        for i in range(offset, offset + count):
            pixels = np.zeros((8, 8), dtype=np.uint8)
            pixels[0, 0], pixels[0, 1] = divmod(i, 256)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            image = CORRUPT if i in corrupt else buf.getvalue()
            yield Sample(key=f"s{i:05d}", image=image, ext="png", label=i % 10)

    out.mkdir(parents=True, exist_ok=True)
    train, train_rows = write_split(samples(0), out, "train", per_shard)
    val, val_rows = write_split(samples(10_000), out, "val", per_shard)
    extra = {"channels": 1, "mean": [0.1], "std": [0.2]}
    write_card(
        out,
        "numbered",
        {"train": train, "val": val},
        train_rows + val_rows,
        num_classes=10,
        image_ext="png",
        extra=extra,
    )
    return read_split(out, "train")


def _number(img: Image.Image) -> torch.Tensor:
    high, low = img.getpixel((0, 0)), img.getpixel((1, 0))
    return torch.tensor(high * 256 + low)


def _jittery_number(img: Image.Image) -> torch.Tensor:
    """`_number`, after an unseeded random pause: worker timing must not change the order."""
    time.sleep(int.from_bytes(os.urandom(1), "little") / 100_000)
    return _number(img)


def _train(shardset: ShardSet, rank: int, world: int, *, epoch: int = 0, **kw) -> TrainEpoch:
    args = {"seed": 0, "batch_size": 8, "shuffle_buffer": 16, "transform": _number, **kw}
    return TrainEpoch(shardset, rank=rank, world_size=world, epoch=epoch, **args)


def _batches(loader) -> list[list[int]]:
    return [[int(n) for n in numbers] for numbers, _ in loader]


def test_ranks_x_workers_see_every_sample_once(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=192, per_shard=24)  # 8 shards, 2 per stream
    per_rank = [_batches(_train(shardset, r, 2, loader_workers=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [12, 12]  # 2 workers x 48 samples / 8 per batch
    seen = [n for batches in per_rank for batch in batches for n in batch]
    assert sorted(seen) == list(range(192))


def test_uneven_streams_still_give_every_rank_the_same_batches(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=230, per_shard=23)  # 10 shards: 3 + 2 per rank
    loaders = [_train(shardset, r, 2, loader_workers=2) for r in range(2)]
    per_rank = [_batches(loader) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) == 13  # (8 + 5) batches
    assert all(len(batch) == 8 for batches in per_rank for batch in batches)
    seen = [n for batches in per_rank for batch in batches for n in batch]
    assert len(set(seen)) == len(seen)
    # Three ranks over a shuffled shard order: equal counts in every epoch.
    for epoch in range(3):
        counts = {len(_train(shardset, r, 3, epoch=epoch, loader_workers=2)) for r in range(3)}
        assert len(counts) == 1


def test_batches_depend_on_seed_and_epoch_not_on_timing(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=192, per_shard=24)
    first = _batches(_train(shardset, 1, 2, loader_workers=2, transform=_jittery_number))
    assert first == _batches(_train(shardset, 1, 2, loader_workers=2, transform=_jittery_number))
    assert first != _batches(_train(shardset, 1, 2, epoch=1, loader_workers=2))
    assert first != _batches(_train(shardset, 1, 2, loader_workers=2, seed=1))
    # No worker processes: the one stream of a single worker, batch for batch.
    assert _batches(_train(shardset, 0, 2)) == _batches(_train(shardset, 0, 2, loader_workers=1))


def test_too_few_shards_for_the_workers_lowers_the_workers(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=96, per_shard=24)  # 4 shards, 2 ranks
    plan = plan_train_epoch(shardset, world_size=2, workers=4, epoch=0, seed=0, batch_size=8)
    assert [len(streams) for streams in plan.streams] == [2, 2]
    per_rank = [_batches(_train(shardset, r, 2, loader_workers=4)) for r in range(2)]
    assert sorted(n for b in per_rank for batch in b for n in batch) == list(range(96))
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        _train(shardset, 0, 2, loader_workers=2, batch_size=32)  # 24 samples per stream


def test_validation_covers_every_sample_once_across_ranks_and_workers(tmp_path: Path) -> None:
    _numbered(tmp_path, count=100, per_shard=9)  # 12 shards, the last one short
    val = read_split(tmp_path, "val")
    seen, batches = [], []
    for rank in range(2):
        loader = eval_batches(
            val, rank=rank, world_size=2, batch_size=8, transform=_number, loader_workers=2
        )
        got = _batches(loader)
        batches.append(len(got))
        seen += [n for batch in got for n in batch]
    assert sorted(seen) == list(range(10_000, 10_100))
    # Rank 0's workers read 27 + 27 samples (4 + 4 batches, the last ones partial); rank 1's
    # 27 + 19 (4 + 3): unequal, which evaluation allows.
    assert batches == [8, 7]


def test_corrupt_samples_are_skipped_counted_and_topped_up(tmp_path: Path) -> None:
    # 4 shards x 16: with batches of 16 the plan needs every sample, so the one corrupt image
    # leaves the stream a batch short and a second pass over its shards fills it.
    shardset = _numbered(tmp_path, count=64, per_shard=16, corrupt=frozenset({5}))
    for workers in (0, 2):
        loader = _train(shardset, 0, 1, batch_size=16, loader_workers=workers)
        batches = _batches(loader)
        assert len(batches) == len(loader) == 4 and loader.corrupt_samples == 1
        counts = Counter(n for batch in batches for n in batch)
        assert 5 not in counts and max(counts.values()) <= 2


def test_corrupt_validation_samples_are_counted(tmp_path: Path) -> None:
    _numbered(tmp_path, count=50, per_shard=10, corrupt=frozenset({10_003, 10_049}))
    val = read_split(tmp_path, "val")
    loader = eval_batches(val, rank=0, world_size=1, batch_size=16, transform=_number)
    assert sum(len(n) for n in _batches(loader)) == 48 and loader.corrupt_samples == 2


def test_a_missing_or_damaged_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=64, per_shard=16)
    shard = Path(shardset.shards[2].path)
    original = shard.read_bytes()
    shard.unlink()  # after read_split checked it
    for workers in (0, 2):
        with pytest.raises(ShardReadError, match=shard.name):
            _batches(_train(shardset, 0, 1, loader_workers=workers))
    shard.write_bytes(original[: len(original) // 2])  # truncated inside a member
    with pytest.raises(ShardReadError, match=shard.name):
        _batches(eval_batches(shardset, rank=0, world_size=1, batch_size=8, transform=_number))
    shard.write_bytes(original)
    wrong = dataclasses.replace(shardset.shards[2], num_samples=17)
    lying = dataclasses.replace(shardset, shards=(wrong,))
    with pytest.raises(ShardReadError, match=rf"{shard.name} holds 16 samples.*says 17"):
        _batches(eval_batches(lying, rank=0, world_size=1, batch_size=8, transform=_number))


def test_a_pipe_root_reads_the_same_samples(tmp_path: Path) -> None:
    _numbered(tmp_path, count=64, per_shard=16)
    local = open_split(tmp_path, "val")
    piped = open_split(f"pipe:cat {tmp_path}/{{}}", "val")
    assert piped.shards[0].path == f"pipe:cat {tmp_path}/val-00000.tar"

    def numbers(shardset: ShardSet) -> list[list[int]]:
        return _batches(
            eval_batches(shardset, rank=0, world_size=1, batch_size=8, transform=_number)
        )

    assert numbers(piped) == numbers(local)
    with pytest.raises(FileNotFoundError, match=r"missing/card\.json"):
        open_split(f"pipe:cat {tmp_path}/missing/{{}}", "val")
    gone = dataclasses.replace(piped.shards[0], path=f"pipe:cat {tmp_path}/gone.tar")
    with pytest.raises(ShardReadError, match=r"gone\.tar"):
        numbers(dataclasses.replace(piped, shards=(gone,)))


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), mode="RGB")
    return small.resize((width, height), Image.Resampling.BICUBIC)


def test_transform_recipes_give_the_right_shapes() -> None:
    rgb = {"mean": [0.5] * 3, "std": [0.25] * 3}
    paper = build_transforms(img_size=224, augment="imagenet", crop_pct=0.875, **rgb)
    photo = _photo(500, 375)
    assert paper.train(photo).shape == paper.eval(photo).shape == (3, 224, 224)
    assert torch.equal(paper.eval(photo), paper.eval(photo))  # evaluation is deterministic
    torch.manual_seed(0)
    assert not torch.equal(paper.train(photo), paper.train(photo))
    assert paper.eval_decode_size == 256 and paper.train_decode_size > 224 / math.sqrt(0.08)
    digits = build_transforms(img_size=16, mean=[0.1], std=[0.2], augment="digits")
    scan = Image.new("L", (8, 8))
    assert digits.train(scan).shape == digits.eval(scan).shape == (1, 16, 16)
    assert digits.eval_decode_size is None
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_transforms(img_size=16, mean=[0.1], std=[0.2], augment="flip")


def test_imagenet_transforms_match_timms() -> None:
    from timm.data import create_transform

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = build_transforms(img_size=224, mean=mean, std=std, augment="imagenet", crop_pct=0.875)
    timm_eval = create_transform(224, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)
    photo = _photo(500, 375, seed=1)
    diff = (ours.eval(photo) - timm_eval(photo)).abs()  # uint8 rounding: a level or two
    assert diff.max() < 0.05 and diff.mean() < 1e-3
    batch = torch.stack([ours.train(photo), ours.train(photo)])
    assert type(batch) is torch.Tensor and batch.dtype == torch.float32
    with_ra = build_transforms(
        img_size=224,
        mean=mean,
        std=std,
        augment="imagenet",
        crop_pct=0.875,
        auto_augment="rand-m9-mstd0.5-inc1",
    )
    assert with_ra.train(photo).shape == (3, 224, 224)


def test_jpeg_draft_decoding_keeps_the_output_resolution(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _photo(1200, 900).save(buf, format="JPEG", quality=90)
    shards, rows = write_split(
        [Sample(key="big", image=buf.getvalue(), ext="jpg", label=0)], tmp_path, "val", 1
    )
    write_card(tmp_path, "big", {"val": shards}, rows, num_classes=1, image_ext="jpg", extra={})
    val = read_split(tmp_path, "val")
    tf = build_transforms(img_size=224, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=0.875)
    sizes = []

    def record(image: Image.Image) -> torch.Tensor:
        sizes.append(image.size)
        return tf.eval(image)

    outputs = [
        next(iter(eval_batches(val, rank=0, world_size=1, batch_size=1, transform=record, **kw)))
        for kw in ({}, {"decode_size": tf.eval_decode_size})
    ]
    assert sizes == [(1200, 900), (600, 450)]  # half scale: both sides still >= 256
    assert (outputs[0][0] - outputs[1][0]).abs().mean() < 0.05


def test_split_transform_is_its_per_image_then_per_batch_part() -> None:
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = build_transforms(img_size=64, mean=mean, std=std, augment="imagenet", crop_pct=0.875)
    assert isinstance(tf.train, SplitTransform) and isinstance(tf.eval, SplitTransform)
    bicubic = v2.InterpolationMode.BICUBIC
    # torchvision's v2 transforms, as the recipes were written before the split.
    v2_train = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                64, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic, antialias=True
            ),
            v2.RandomHorizontalFlip(),
        ]
    )
    v2_eval = v2.Compose([v2.ToImage(), v2.Resize(73, interpolation=bicubic), v2.CenterCrop(64)])
    v2_normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    for seed in range(8):
        photo = _photo(150, 110, seed=seed)
        torch.manual_seed(seed)
        whole = tf.train(photo)
        torch.manual_seed(seed)
        pixels = tf.train.per_image(photo)
        torch.manual_seed(seed)
        assert torch.equal(pixels, v2_train(photo))  # the same draws, the same pixels
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
        assert whole.dtype == torch.float32
        torch.testing.assert_close(whole, tf.train.per_batch(pixels), rtol=0, atol=1e-6)
        torch.testing.assert_close(whole, v2_normalize(pixels), rtol=0, atol=1e-5)
        assert torch.equal(tf.eval.per_image(photo), v2_eval(photo))
        torch.testing.assert_close(tf.eval(photo), v2_normalize(v2_eval(photo)), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    assert len({tf.train.per_image(photo)[0, 0, 0].item() for _ in range(8)}) > 1
    # A batch normalises as its images do, one at a time.
    batch = torch.stack([tf.eval.per_image(_photo(90, 120, seed=s)) for s in range(3)])
    singles = torch.stack([tf.eval.per_batch(image) for image in batch])
    torch.testing.assert_close(tf.eval.per_batch(batch), singles, rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        tf.eval.per_batch(batch.float())
    # A batch in (N, H, W, C) memory order, as the loader collates crops, normalises the same,
    # into contiguous memory.
    channels_last = batch.contiguous(memory_format=torch.channels_last)
    normalised = tf.eval.per_batch(channels_last)
    assert normalised.is_contiguous() and torch.equal(normalised, tf.eval.per_batch(batch))
    # Pickled for loader workers without its per-device statistics (no CUDA in a fork).
    assert tf.eval._stats and pickle.loads(pickle.dumps(tf.eval))._stats == {}
    # Grayscale images get their channel dimension.
    gray = build_transforms(img_size=16, mean=[0.5], std=[0.25], augment="imagenet", crop_pct=1)
    scan = _photo(40, 30).convert("L")
    torch.manual_seed(1)
    pixels = gray.train.per_image(scan)
    torch.manual_seed(1)
    assert pixels.shape == (1, 16, 16)
    assert torch.equal(gray.train(scan), gray.train.per_batch(pixels))


def _photo_shards(out: Path, count: int, per_shard: int) -> ShardSet:
    """Train and val splits of `count` small random-colour JPEGs each (labels: i % 3)."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def samples(offset: int):
        for i in range(offset, offset + count):
            buf = io.BytesIO()
            _photo(48 + i % 5 * 4, 40, seed=i).save(buf, format="JPEG", quality=90)
            yield Sample(key=f"p{i:05d}", image=buf.getvalue(), ext="jpg", label=i % 3)

    out.mkdir(parents=True, exist_ok=True)
    train, train_rows = write_split(samples(0), out, "train", per_shard)
    val, val_rows = write_split(samples(1_000), out, "val", per_shard)
    write_card(
        out,
        "photos",
        {"train": train, "val": val},
        train_rows + val_rows,
        num_classes=3,
        image_ext="jpg",
        extra={"channels": 3, "mean": mean, "std": std},
    )
    return read_split(out, "train")


def test_split_transform_batches_equal_the_whole_transform_per_image(tmp_path: Path) -> None:
    shardset = _photo_shards(tmp_path, count=48, per_shard=12)  # 4 shards
    val = read_split(tmp_path, "val")
    tf = build_transforms(
        img_size=32,
        mean=shardset.extra["mean"],
        std=shardset.extra["std"],
        augment="imagenet",
        crop_pct=0.875,
    )

    def whole_train(image: Image.Image) -> torch.Tensor:  # not a SplitTransform: run whole
        return tf.train(image)

    def whole_eval(image: Image.Image) -> torch.Tensor:
        return tf.eval(image)

    def assert_same(split: list, whole: list) -> None:
        assert len(split) == len(whole) > 1
        for (images, labels), (expected, expected_labels) in zip(split, whole, strict=True):
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert images.is_contiguous()  # though the workers' uint8 batches are (N, H, W, C)
            torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
            assert torch.equal(labels, expected_labels)

    for workers in (0, 2):
        for device in (None, "cpu"):
            epoch = _train(
                shardset, 0, 1, epoch=1, transform=tf.train, loader_workers=workers, device=device
            )
            # The workers run the per-image part; the batches are normalised after them.
            assert epoch.streams.transform is tf.train.per_image
            split = list(epoch)
            assert all(images.device.type == "cpu" for images, _ in split)
            whole = list(
                _train(shardset, 0, 1, epoch=1, transform=whole_train, loader_workers=workers)
            )
            assert_same(split, whole)
            assert len(split) == len(epoch) == 6  # 48 samples / 8 per batch
        evaluated = eval_batches(
            val, rank=0, world_size=1, batch_size=8, transform=tf.eval, loader_workers=workers
        )
        assert_same(
            list(evaluated),
            list(
                eval_batches(
                    val,
                    rank=0,
                    world_size=1,
                    batch_size=8,
                    transform=whole_eval,
                    loader_workers=workers,
                )
            ),
        )
    # Real pictures, not constant ones: a crop or normalisation gone wrong would show.
    assert split[0][0].std() > 0.3


def test_device_moves_batches_of_any_transform(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=64, per_shard=16)
    for workers in (0, 2):
        moved = _train(shardset, 0, 1, loader_workers=workers, device=torch.device("cpu"))
        assert _batches(moved) == _batches(_train(shardset, 0, 1, loader_workers=workers))
        assert moved.corrupt_samples == 0
    val = read_split(tmp_path, "val")
    batches = list(
        eval_batches(val, rank=0, world_size=1, batch_size=8, transform=_number, device="cpu")
    )
    assert sum(len(labels) for _, labels in batches) == 64


# Loader worker processes (cbtlab.data.workers).


def _boom(img: Image.Image) -> torch.Tensor:
    raise ValueError(f"boom at {_number(img)}")


def _exit_at_third(img: Image.Image) -> torch.Tensor:
    if int(_number(img)) % 24 == 2:  # the third sample of a 24-sample shard
        os._exit(3)
    return _number(img)


# Both ways a pool starts its workers (see `default_start_method`).
START_METHODS = pytest.mark.parametrize("start_method", ["fork", "forkserver"])


def _ran_in_a_process_without_ray(request: pytest.FixtureRequest, start_method: str) -> bool:
    """Runs this test again in a fresh pytest if it forks workers and this process is connected
    to Ray (the session's shared instance): forking here is what the pool avoids. True if it
    did (and that run passed)."""
    ray = sys.modules.get("ray")
    if start_method != "fork" or ray is None or not ray.is_initialized():
        return False
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        cwd=request.config.rootpath,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-4000:]
    return True


def test_workers_are_not_forked_from_a_process_connected_to_ray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    assert default_start_method() == "fork"
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert default_start_method() == "forkserver"
    monkeypatch.delitem(sys.modules, "ray")
    assert default_start_method() == "fork"


@START_METHODS
def test_a_pool_keeps_its_workers_and_gives_the_same_batches(
    tmp_path: Path, start_method: str, request: pytest.FixtureRequest
) -> None:
    if _ran_in_a_process_without_ray(request, start_method):
        return
    shardset = _numbered(tmp_path, count=192, per_shard=24)
    with WorkerPool(start_method) as pool:
        first = _batches(_train(shardset, 1, 2, loader_workers=2, pool=pool))
        pids = pool.pids
        assert len(pids) == 2 and not pool.busy
        # Forked by this process, or by a forkserver.
        forked_here = [_parent(pid) == os.getpid() for pid in pids]
        assert forked_here == [start_method == "fork"] * 2
        # Another epoch, then evaluation, then the first epoch again: the same two processes.
        assert _batches(_train(shardset, 1, 2, epoch=1, loader_workers=2, pool=pool)) != first
        val = read_split(tmp_path, "val")
        evaluated = eval_batches(
            val, rank=0, world_size=1, batch_size=8, transform=_number, loader_workers=2, pool=pool
        )
        assert sorted(n for batch in _batches(evaluated) for n in batch) == list(
            range(10_000, 10_192)
        )
        assert _batches(_train(shardset, 1, 2, loader_workers=2, pool=pool)) == first
        assert pool.pids == pids
        # Without a pool, workers made for the epoch alone: the same batches.
        assert _batches(_train(shardset, 1, 2, loader_workers=2)) == first
        # Batches held past later ones stay intact, though each crossed in a reused buffer.
        held = [numbers for numbers, _ in _train(shardset, 1, 2, loader_workers=2, pool=pool)]
        assert [[int(n) for n in numbers] for numbers in held] == first
    assert all(not _alive(pid) for pid in pids)


def test_breaking_off_an_epoch_leaves_the_pool_ready(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=192, per_shard=24)
    expected = _batches(_train(shardset, 0, 1, epoch=1, loader_workers=2))
    with WorkerPool() as pool:
        for taken in (1, 5):
            batches = iter(_train(shardset, 0, 1, loader_workers=2, pool=pool))
            for _ in range(taken):
                next(batches)
            batches.close()  # the workers are mid-epoch, with batches waiting
            assert not pool.busy
            assert _batches(_train(shardset, 0, 1, epoch=1, loader_workers=2, pool=pool)) == (
                expected
            )
        # A pool is run one epoch at a time: a second epoch meanwhile gets workers of its own.
        outer = iter(_train(shardset, 0, 1, loader_workers=2, pool=pool))
        next(outer)
        assert _batches(_train(shardset, 0, 1, epoch=1, loader_workers=2, pool=pool)) == expected
        with pytest.raises(RuntimeError, match="already running"):
            next(iter(pool.run(lambda worker: iter(()), 1, lambda images: images)))
        outer.close()


def test_a_worker_error_is_raised_as_itself_with_the_workers_traceback(tmp_path: Path) -> None:
    shardset = _numbered(tmp_path, count=64, per_shard=16)
    with WorkerPool() as pool:
        with pytest.raises(ValueError, match=r"boom at \d+") as caught:
            _batches(_train(shardset, 0, 1, loader_workers=2, transform=_boom, pool=pool))
        assert isinstance(caught.value.__cause__, RemoteTraceback)
        assert "_boom" in caught.value.__cause__.text  # where in the worker it was raised
        # The epoch was left half-read: the next one runs on new workers.
        assert pool.pids == []
        assert _batches(_train(shardset, 0, 1, loader_workers=2, pool=pool))


@START_METHODS
def test_a_dead_worker_is_a_clear_error_and_the_next_epoch_recovers(
    tmp_path: Path, start_method: str, request: pytest.FixtureRequest
) -> None:
    if _ran_in_a_process_without_ray(request, start_method):
        return
    shardset = _numbered(tmp_path, count=192, per_shard=24)
    expected = _batches(_train(shardset, 0, 1, loader_workers=2))
    with WorkerPool(start_method) as pool:
        with pytest.raises(
            LoaderWorkerError, match=r"loader worker \d \(pid \d+\) exited with code 3"
        ):
            _batches(_train(shardset, 0, 1, loader_workers=2, transform=_exit_at_third, pool=pool))
        assert pool.pids == []  # given up
        assert _batches(_train(shardset, 0, 1, loader_workers=2, pool=pool)) == expected
        # Killed from outside while it works.
        batches = iter(_train(shardset, 0, 1, loader_workers=2, pool=pool))
        next(batches)
        os.kill(pool.pids[1], signal.SIGKILL)
        with pytest.raises(LoaderWorkerError, match="killed by signal SIGKILL"):
            list(batches)
        assert _batches(_train(shardset, 0, 1, loader_workers=2, pool=pool)) == expected
        # Killed between epochs: the next epoch starts new workers and loses nothing.
        idle = pool.pids[0]
        os.kill(idle, signal.SIGKILL)
        while _alive(idle):
            time.sleep(0.01)
        assert _batches(_train(shardset, 0, 1, loader_workers=2, pool=pool)) == expected
        assert idle not in pool.pids


@START_METHODS
def test_workers_exit_when_their_process_dies_without_cleaning_up(
    tmp_path: Path, start_method: str
) -> None:
    # The pool is made in a subprocess without Ray: forking there is what a pool does.
    _numbered(tmp_path, count=64, per_shard=16)
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from types import SimpleNamespace
from test_loader import _train, _batches, read_split
from cbtlab.data import WorkerPool
pool = WorkerPool({start_method!r})
shards = read_split(Path({str(tmp_path)!r}), "train")
_batches(_train(shards, 0, 1, loader_workers=2, pool=pool))
print(*pool.pids, flush=True)
os._exit(0)  # no atexit handlers, no finalizers: as if killed
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    """Whether any thread of `pid` runs (a zombie, exited but not yet reaped, does not)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue
    return any(state not in ("Z", "X") for state in states)


def _tar(members: list[tuple[str, bytes]], fmt: int, compression: str = "") -> bytes:
    """A tar written by Python's tarfile in format `fmt`, with a directory, a symlink and a
    webdataset metadata member around `members`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in [("__meta__", b"{}"), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "folder"
        tar.addfile(link)
    return buf.getvalue()


def _shard(
    path: Path, members: list[tuple[str, bytes]], fmt: int, compression: str = ""
) -> ShardInfo:
    path.write_bytes(_tar(members, fmt, compression))
    samples = len({name.split(".")[0] for name, _ in members})
    return ShardInfo(str(path), num_samples=samples, num_bytes=path.stat().st_size)


def test_shards_in_every_tar_format_and_compression_read_alike(tmp_path: Path) -> None:
    long_key = "deep/" + "k" * 140  # past the 100 bytes of a plain header's name
    members = [
        ("a.jpg", os.urandom(700)),
        ("a.cls", b"3"),
        (f"{long_key}.jpg", os.urandom(1024)),
        (f"{long_key}.cls", b"1"),
        ("ünï.cls", b"2"),
    ]
    expected = [
        {"__key__": "a", "jpg": members[0][1], "cls": b"3"},
        {"__key__": long_key, "jpg": members[2][1], "cls": b"1"},
        {"__key__": "ünï", "cls": b"2"},
    ]
    # ustar keeps a long name in its prefix field, GNU in an 'L' header, pax in an 'x' header;
    # the directory, the symlink and webdataset's `__meta__` member around them are passed over.
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for compression in ("", "gz", "xz"):
            if fmt == tarfile.USTAR_FORMAT and compression:
                continue
            cases = members if fmt != tarfile.USTAR_FORMAT else members[:2]
            shard = _shard(tmp_path / f"s-{fmt}-{compression}.tar", cases, fmt, compression)
            read = [{k: v for k, v in s.items() if k != "__url__"} for s in _read_shard(shard)]
            assert read == expected[: shard.num_samples], (fmt, compression)


def test_a_truncated_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    members = [("a.jpg", os.urandom(700)), ("a.cls", b"3"), ("b" * 150 + ".jpg", os.urandom(900))]
    data = _tar(members, tarfile.GNU_FORMAT)
    ends = []  # where each member's padded data ends
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            if info.isreg() and info.name != "__meta__":
                ends.append(info.offset_data + -(-info.size // 512) * 512)
    path = tmp_path / "cut-00000.tar"
    info = ShardInfo(str(path), num_samples=2, num_bytes=len(data))
    # Inside a member's data or padding, a header or a GNU long name: the reader fails; at a
    # member's end: whole members, so the count against the card fails. Either names the shard.
    for cut in (ends[0] - 100, ends[0] - 1, ends[0] + 100, ends[1] + 512 + 3, ends[2] - 1, ends[1]):
        path.write_bytes(data[:cut])
        with pytest.raises(ShardReadError, match=path.name):
            list(_read_shard(info))
    damaged = bytearray(data)
    damaged[ends[0] + 10] ^= 0xFF  # inside the next header: its checksum no longer adds up
    for junk in (bytes(damaged), b"", b"not a tar at all"):
        path.write_bytes(junk)
        with pytest.raises(ShardReadError, match=path.name):
            list(_read_shard(info))


def test_a_shard_with_long_member_names_reads_and_a_truncated_one_names_itself(
    tmp_path: Path,
) -> None:
    key = "class_7/" + "n" * 120
    members = [
        (f"{key}-{i}.{ext}", data) for i in range(3) for ext, data in (("jpg", b"j"), ("cls", b"7"))
    ]
    shard = tmp_path / "long-00000.tar"
    shard.write_bytes(_tar(members, tarfile.GNU_FORMAT))
    info = ShardInfo(str(shard), num_samples=3, num_bytes=shard.stat().st_size)
    samples = list(_read_shard(info))
    assert [s["__key__"] for s in samples] == [f"{key}-{i}" for i in range(3)]
    assert all(s["cls"] == b"7" and s["jpg"] == b"j" for s in samples)
    shard.write_bytes(shard.read_bytes()[:1800])  # inside the first long-name header
    with pytest.raises(ShardReadError, match=shard.name):
        list(_read_shard(info))


def test_corrupt_counts_reach_the_training_metrics(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    _numbered(root, count=256, per_shard=32, corrupt=frozenset({7, 10_001}))
    cfg = ExperimentConfig().with_overrides(
        {
            "data.dataset": "shards",
            "data.root": str(root),
            "data.augment": "none",
            "data.loader_workers": 2,
            "data.batch_size": 32,
            "model.embed_dim": 24,
            "model.depth": 1,
            "model.num_heads": 3,
            "model.rep_grid": "2x2",
            "train.epochs": 1,
            "train.num_workers": 1,
        }
    )
    from cbtlab.train import run_training
    from cbtlab.train.faults import FailAt, InjectedFailure

    reports: list[dict[str, float]] = []
    run_training(cfg, report=lambda metrics, state: reports.append(metrics))
    assert reports[0]["data/corrupt_samples"] == 1
    assert reports[0]["val/corrupt_samples"] == 1 and reports[0]["val/samples"] == 255
    with pytest.raises(ValueError, match=r"model\.num_classes=10"):
        run_training(cfg.with_overrides({"model.num_classes": 5}), report=lambda m, s: None)
    # A run that fails mid-epoch stops its loader workers, though its traceback (held here)
    # keeps the run's frame, and so its pool, alive.
    with pytest.raises(InjectedFailure) as failed:
        run_training(cfg, report=lambda m, s: None, fail_at=FailAt(epoch=0, step=2, rank=0))
    loaders = [p for p in multiprocessing.active_children() if p.name.startswith("cbtlab-loader")]
    assert loaders == []
    assert "epoch 0, step 2" in str(failed.value)
