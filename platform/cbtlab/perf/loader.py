"""Loader throughput: our WebDataset loader (`TrainEpoch` over shards, in a `WorkerPool`)
against torchvision's ImageFolder + DataLoader on the same JPEGs, the same transform, worker
count and batch size (`data_pipelines/bench_loader.py`).

`run_bench` makes an ImageNet-like JPEG ImageFolder tree and its shards (timing the shard
writing), then times whole epochs of each loader after a warm-up, in repeats that alternate
which goes first: images/s (the result's `ratio` is the median of the paired ratios) and CPU
time per image of all processes. `cache="cold"` drops every file from the page cache before
each timed epoch (a dataset larger than memory), `"warm"` keeps them cached. A per-image cost
breakdown (one process, one torch thread) names each loader's steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from webdataset.tariterators import tar_file_iterator

from cbtlab.data.loader import TrainEpoch, _collate, _group
from cbtlab.data.shards import Sample, ShardSet, read_split, write_card, write_split
from cbtlab.data.tarstream import tar_members
from cbtlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SplitTransform,
    Transforms,
    build_transforms,
)
from cbtlab.data.workers import WorkerPool

EXTENSIONS = (".jpg", ".jpeg")
CACHE_MODES = ("cold", "warm")
# The steps of the cost breakdown each loader pays per image (see the module docstring).
IMAGEFOLDER_STEPS = (
    "open+read file",
    "decode+convert JPEG",
    "crop+resize+flip",
    "normalise alone",
    "float32 batch into new shared memory",
)
WEBDATASET_WORKER_STEPS = (
    "tar sample",
    "decode JPEG",
    "crop+resize+flip",
    "uint8 batch into its reused slot",
)
WEBDATASET_MAIN_STEP = "normalise a collated batch"


@dataclass
class BenchConfig:
    images: int = 384
    classes: int = 4
    width: int = 500
    height: int = 375
    quality: int = 90
    samples_per_shard: int = 64
    workers: int = 2
    batch_size: int = 32
    img_size: int = 224
    repeats: int = 7
    seed: int = 0
    # "cold": both loaders' files are dropped from the page cache before every timed epoch, so
    # each epoch reads them from the disk, as a dataset larger than memory (ImageNet's 140 GB)
    # is read; "warm": they stay cached after the warm-up epoch.
    cache: str = "cold"
    # Torch threads of the main process while timing: one, as in each worker, since the workers
    # take the cores (a second thread spun against them, doubling the main process's CPU time
    # in the normalisation).
    main_threads: int = 1


@dataclass
class BenchResult:
    config: BenchConfig
    image_bytes: int
    write_s: float
    webdataset_img_s: list[float]
    imagefolder_img_s: list[float]
    costs_ms: dict[str, float]
    # CPU milliseconds per image, the main process and its workers together, per repeat.
    webdataset_cpu_ms: list[float] = field(default_factory=list)
    imagefolder_cpu_ms: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """The median over repeats of webdataset/imagefolder, each pair timed back to back:
        robust to the machine's load drifting between repeats."""
        pairs = zip(self.webdataset_img_s, self.imagefolder_img_s, strict=True)
        return statistics.median(w / f for w, f in pairs)

    def lines(self) -> list[str]:
        cfg = self.config
        mb = self.image_bytes / 1e6
        out = [
            f"{cfg.images} JPEGs of {cfg.width}x{cfg.height} in {cfg.classes} classes "
            f"({mb:.1f} MB, {self.image_bytes / cfg.images / 1e3:.0f} kB each); "
            f"{cfg.workers} loader workers, batch {cfg.batch_size}, RRC {cfg.img_size} + flip "
            f"+ normalise (imagefolder: whole, per image, in the workers; webdataset: normalised "
            f"per uint8 batch in the main process, {cfg.main_threads} torch thread(s)); "
            f"{cfg.repeats} interleaved repeats after a warm-up; page cache {cfg.cache} "
            + (
                "(every file dropped from it before each epoch)"
                if cfg.cache == "cold"
                else "(the files stay cached)"
            ),
            f"shard writing: {cfg.images / self.write_s:.0f} images/s, "
            f"{mb / self.write_s:.1f} MB/s ({cfg.samples_per_shard} samples per shard)",
        ]
        for name, rates in (
            ("webdataset (TrainEpoch)", self.webdataset_img_s),
            ("imagefolder (torchvision)", self.imagefolder_img_s),
        ):
            spread = ", ".join(f"{r:.0f}" for r in rates)
            out.append(f"{name:27s} {statistics.median(rates):7.1f} images/s  [{spread}]")
        if self.webdataset_cpu_ms and self.imagefolder_cpu_ms:
            cpu = zip(self.imagefolder_cpu_ms, self.webdataset_cpu_ms, strict=True)
            out.append(
                "CPU per image, all processes (ms): webdataset "
                f"{statistics.median(self.webdataset_cpu_ms):.2f}, imagefolder "
                f"{statistics.median(self.imagefolder_cpu_ms):.2f}; the median of the paired "
                f"imagefolder/webdataset ratios {statistics.median(f / w for f, w in cpu):.2f} "
                "(what a busy machine's images/s ratio drifts with less)"
            )
        costs = self.costs_ms
        out.append(
            "per image, one process (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
        )
        folder = sum(costs[k] for k in IMAGEFOLDER_STEPS)
        ours = sum(costs[k] for k in WEBDATASET_WORKER_STEPS)
        out.append(
            f"per image, summed (ms): imagefolder {folder:.2f} in a worker; webdataset "
            f"{ours:.2f} in a worker + {costs[WEBDATASET_MAIN_STEP]:.2f} in the main process"
        )
        medians = statistics.median(self.webdataset_img_s) / statistics.median(
            self.imagefolder_img_s
        )
        out.append(f"ratio of the medians {medians:.2f}; the median of the paired ratios:")
        out.append(f"webdataset/imagefolder images/s ratio: {self.ratio:.2f}")
        return out


def make_image_folder(root: Path, cfg: BenchConfig) -> list[Path]:
    """An ImageFolder tree `root/class_k/img_nnnnn.jpg` of smooth random images with noise,
    which compress about as well as photos."""
    rng = np.random.default_rng(cfg.seed)
    paths = []
    for i in range(cfg.images):
        folder = root / f"class_{i % cfg.classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse, mode="RGB").resize(
            (cfg.width, cfg.height), Image.Resampling.BICUBIC
        )
        noise = rng.normal(0, 6, (cfg.height, cfg.width, 3))
        pixels = np.clip(np.asarray(smooth, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(pixels, mode="RGB").save(path, format="JPEG", quality=cfg.quality)
        paths.append(path)
    return paths


def shard_image_folder(tree: Path, out: Path, samples_per_shard: int) -> None:
    """Write an ImageFolder tree's JPEGs (bytes as they are) as WebDataset train shards."""
    classes = sorted(p.name for p in tree.iterdir() if p.is_dir())

    def samples() -> Iterator[Sample]:
        for label, name in enumerate(classes):
            for path in sorted((tree / name).iterdir()):
                if path.suffix.lower() in EXTENSIONS:
                    key = f"{name}-{path.stem}"
                    yield Sample(key=key, image=path.read_bytes(), ext="jpg", label=label)

    out.mkdir(parents=True, exist_ok=True)
    shards, rows = write_split(samples(), out, "train", samples_per_shard)
    write_card(
        out,
        tree.name,
        {"train": shards},
        rows,
        num_classes=len(classes),
        image_ext="jpg",
        extra={"channels": 3, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )


def _epoch_rate(batches: Iterable[Any], pool: WorkerPool) -> tuple[float, float]:
    """Images/s of one epoch, and the CPU milliseconds per image of this process and of its
    loader workers: children counted once joined at the epoch's end (DataLoader's), and the
    workers of `pool`, which live on."""
    cpu_start, start = _cpu_s(pool), time.perf_counter()
    count, staging = 0, None
    for images, labels in batches:
        # Use every batch as a training step's host-to-device copy does: read it once.
        if staging is None:
            staging = torch.empty_like(images)
        staging[: len(images)].copy_(images)
        count += len(labels)
    elapsed, cpu = time.perf_counter() - start, _cpu_s(pool) - cpu_start
    return count / elapsed, cpu / count * 1e3


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Evict the files' pages from the page cache (written out first), so that the next read
    comes from the disk; Linux's posix_fadvise, no privileges needed."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu_s(pool: WorkerPool) -> float:
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return own + (pool.cpu_seconds() or math.nan)


def _per_image_ms(step: Callable[[Any], Any], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        step(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def _per_batched_image_ms(step: Callable[[Any], Any], batches: list[Any]) -> float:
    return _per_image_ms(step, batches) * len(batches) / sum(len(b) for b in batches)


def run_bench(cfg: BenchConfig, root: Path | None = None) -> BenchResult:
    """Make the data under `root` (a temporary folder when None) and time both loaders."""
    if cfg.cache not in CACHE_MODES:
        raise ValueError(f"cache={cfg.cache!r}; expected one of {CACHE_MODES}")
    if cfg.cache == "cold" and not hasattr(os, "posix_fadvise"):
        raise ValueError("cache='cold' needs posix_fadvise (Linux); use cache='warm'")
    with tempfile.TemporaryDirectory(prefix="cbtlab-bench-") as tmp:
        base = Path(root) if root is not None else Path(tmp)
        tree, shard_dir = base / "imagefolder", base / "shards"
        paths = make_image_folder(tree, cfg)
        image_bytes = sum(p.stat().st_size for p in paths)
        start = time.perf_counter()
        shard_image_folder(tree, shard_dir, cfg.samples_per_shard)
        write_s = time.perf_counter() - start

        shardset = read_split(shard_dir, "train")
        tf = build_transforms(
            img_size=cfg.img_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            augment="imagenet",
            crop_pct=0.875,
        )
        rates, cpu_ms = _time_loaders(cfg, tree, paths, shardset, tf)
        assert isinstance(tf.train, SplitTransform)
        costs = _cost_breakdown(paths[:64], shard_dir, tf.train, cfg.batch_size)
    return BenchResult(
        cfg,
        image_bytes,
        write_s,
        rates["wds"],
        rates["folder"],
        costs,
        webdataset_cpu_ms=cpu_ms["wds"],
        imagefolder_cpu_ms=cpu_ms["folder"],
    )


def _time_loaders(
    cfg: BenchConfig, tree: Path, paths: list[Path], shardset: ShardSet, tf: Transforms
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images/s and CPU ms per image of each loader ("wds", "folder") per repeat, after a
    warm-up epoch of each."""
    folder = ImageFolder(str(tree), transform=tf.train)
    pool = WorkerPool()  # TrainEpoch's workers, kept from epoch to epoch

    def webdataset_epoch(epoch: int) -> tuple[float, float]:
        return _epoch_rate(
            TrainEpoch(
                shardset,
                rank=0,
                world_size=1,
                epoch=epoch,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                shuffle_buffer=cfg.samples_per_shard,
                transform=tf.train,
                loader_workers=cfg.workers,
                decode_size=tf.train_decode_size,
                pool=pool,
            ),
            pool,
        )

    def imagefolder_epoch(epoch: int) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000 + epoch)
        return _epoch_rate(
            DataLoader(
                folder,
                batch_size=cfg.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=cfg.workers,
                generator=generator,
            ),
            pool,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.main_threads)
    try:
        webdataset_epoch(0), imagefolder_epoch(0)  # warm-up: page cache, imports, forks
        rates: dict[str, list[float]] = {"wds": [], "folder": []}
        cpu_ms: dict[str, list[float]] = {"wds": [], "folder": []}
        for repeat in range(1, cfg.repeats + 1):
            # Alternate which goes first, so drifts in machine load hit both alike.
            order = [("wds", webdataset_epoch), ("folder", imagefolder_epoch)]
            for name, run in order if repeat % 2 else order[::-1]:
                if cfg.cache == "cold":
                    drop_from_page_cache([*paths, *(Path(s.path) for s in shardset.shards)])
                rate, cpu = run(repeat)
                rates[name].append(rate)
                cpu_ms[name].append(cpu)
    finally:
        torch.set_num_threads(threads)
        pool.close()
    return rates, cpu_ms


def _cost_breakdown(
    paths: list[Path], shard_dir: Path, transform: SplitTransform, batch_size: int
) -> dict[str, float]:
    """Milliseconds per image of each step, in one process with one torch thread (as in a
    DataLoader worker): what either loader pays per image."""
    shards = read_split(shard_dir, "train").shards
    encoded = [p.read_bytes() for p in paths]

    def decode(data: bytes) -> Image.Image:  # as TrainEpoch: RGB JPEGs need no conversion
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def decode_convert(data: bytes) -> Image.Image:  # as ImageFolder's default loader
        return Image.open(io.BytesIO(data)).convert("RGB")

    decoded = [decode(b) for b in encoded]

    def webdataset_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
        return ((m["fname"], m["data"]) for m in tar_file_iterator(stream))

    def tar_ms(members: Callable[[IO[bytes]], Iterable[tuple[str, bytes]]]) -> float:
        start, count = time.perf_counter(), 0
        for shard in shards:
            with open(shard.path, "rb") as stream:
                count += sum(1 for _ in _group(members(stream), shard.path))
        return (time.perf_counter() - start) / count * 1e3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pixels = [transform.per_image(image) for image in decoded]
        uint8_batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
        float_batches = [[transform.per_batch(p) for p in batch] for batch in uint8_batches]
        collated = [_collate([(p, 0) for p in batch])[0] for batch in uint8_batches]
        slot = torch.empty(collated[0].numel(), dtype=torch.uint8).share_memory_()

        def into_slot(batch: list[torch.Tensor]) -> torch.Tensor:
            images = _collate([(p, 0) for p in batch])[0]
            view = slot[: images.numel()].as_strided(images.shape, images.stride())
            return view.copy_(images)

        return {
            "open+read file": _per_image_ms(lambda p: p.read_bytes(), paths),
            "tar sample": tar_ms(tar_members),
            "tar sample by webdataset's reader": tar_ms(webdataset_members),
            "decode JPEG": _per_image_ms(decode, encoded),
            "decode+convert JPEG": _per_image_ms(decode_convert, encoded),
            "crop+resize+flip": _per_image_ms(transform.per_image, decoded),
            "normalise alone": _per_image_ms(transform.per_batch, pixels),
            "normalise a collated batch": _per_batched_image_ms(transform.per_batch, collated),
            "uint8 batch into its reused slot": _per_batched_image_ms(into_slot, uint8_batches),
            "float32 batch into new shared memory": _per_batched_image_ms(
                _shared_stack, float_batches
            ),
        }
    finally:
        torch.set_num_threads(threads)


def _shared_stack(images: list[torch.Tensor]) -> torch.Tensor:
    """A batch stacked into new shared memory, as a DataLoader worker's batch ends up (torch's
    default_collate stacks into it; a batch made otherwise is copied there when it is sent)."""
    first = images[0]
    storage = torch.UntypedStorage._new_shared(len(images) * first.nbytes)
    out = torch.empty(0, dtype=first.dtype).set_(storage).view(len(images), *first.shape)
    return torch.stack(images, out=out)


def bench_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab data bench`: flags from `BenchConfig`'s fields, then the bench's lines; the last
    is `webdataset/imagefolder images/s ratio: X.XX`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark our WebDataset loader against torchvision's ImageFolder on the "
        "same JPEGs (an ImageNet-like tree made in a temporary folder, or under --root).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=None, help="keep the data here")
    for option in dataclasses.fields(BenchConfig):
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            type=type(option.default),
            default=option.default,
            choices=CACHE_MODES if option.name == "cache" else None,
            help=option.name,
        )
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    for line in run_bench(cfg, args.root).lines():
        print(line, flush=True)
    return 0
