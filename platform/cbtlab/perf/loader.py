"""Loader throughput: our WebDataset loader against the best standard library setups on the same
data (`cbtlab data bench`, `data_pipelines/bench_loader.py`): webdataset's own `WebLoader` over
our shards, and torch's `DataLoader` over the ImageFolder, both with persistent workers (and
pinned memory where a GPU is present), the same transform, decode, collate, worker count and
batch size. Our loader runs on those same pieces (torch's DataLoader, webdataset's tar reader):
what it adds is its plan (deterministic streams, equal batches on every rank, read-ahead,
corrupt-sample accounting), and the ratio says what that costs or gains. (A hand-written worker
pool and tar reader it had were measured against these paths by this bench and deleted: they
did not win by the 1.2x that would have kept them; docs/training.md.)

`run_bench` makes an ImageNet-like JPEG ImageFolder tree and its shards (timing the shard
writing), then times whole epochs of each loader after a warm-up, in repeats that rotate which
goes first: images/s (`BenchResult.ratio`: ours over the best library path, the median of the
per-repeat ratios) and CPU time per image of all processes. `cache="cold"` drops every file
from the page cache before each timed epoch (a dataset larger than memory), `"warm"` keeps them
cached. A per-image cost breakdown (one process, one torch thread) names each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from cbtlab.data.checksums import checksum_cost
from cbtlab.data.loader import TrainEpoch, _collate, _group, _tar_members
from cbtlab.data.shards import Sample, ShardSet, read_split, write_card, write_split
from cbtlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SplitTransform,
    build_transforms,
)
from cbtlab.data.workers import WorkerPool, processes_cpu_seconds

EXTENSIONS = (".jpg", ".jpeg")
CACHE_MODES = ("cold", "warm")
# The steps of the cost breakdown each loader pays per image (see the module docstring).
IMAGEFOLDER_STEPS = (
    "open+read file",
    "decode JPEG",
    "crop+resize+flip",
    "uint8 batch into new shared memory",
)
WEBLOADER_STEPS = (
    "tar sample",
    "decode JPEG",
    "crop+resize+flip",
    "uint8 batch into new shared memory",
)
# Ours reads and ships its batches alike, and checks each sample against the manifest.
WEBDATASET_WORKER_STEPS = (*WEBLOADER_STEPS, "sha256 check against the manifest")
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


# The loaders timed, by key: ours, and the best standard library setups on the same data.
LOADERS = {
    "ours": "ours (TrainEpoch: our streams on the two)",
    "webloader": "webdataset WebLoader (shards)",
    "imagefolder": "torch DataLoader (ImageFolder)",
}
LIBRARY_LOADERS = ("webloader", "imagefolder")


@dataclass
class BenchResult:
    config: BenchConfig
    image_bytes: int
    write_s: float
    # Images/s and CPU milliseconds per image (all processes) per repeat, by `LOADERS` key.
    img_s: dict[str, list[float]]
    cpu_ms: dict[str, list[float]]
    costs_ms: dict[str, float]

    def paired_ratio(self, loader: str, against: Sequence[str]) -> float:
        """The median over repeats of `loader`'s images/s over the best of `against` in the
        same repeat (timed back to back: robust to the machine's load drifting)."""
        per_repeat = zip(*(self.img_s[name] for name in (loader, *against)), strict=True)
        return statistics.median(rates[0] / max(rates[1:]) for rates in per_repeat)

    @property
    def ratio(self) -> float:
        """Ours over the best library path, repeat by repeat (the median)."""
        return self.paired_ratio("ours", LIBRARY_LOADERS)

    def lines(self) -> list[str]:
        cfg = self.config
        mb = self.image_bytes / 1e6
        out = [
            f"{cfg.images} JPEGs of {cfg.width}x{cfg.height} in {cfg.classes} classes "
            f"({mb:.1f} MB, {self.image_bytes / cfg.images / 1e3:.0f} kB each); "
            f"{cfg.workers} loader workers kept from epoch to epoch, batch {cfg.batch_size}; "
            f"every loader decodes alike, crops+resizes+flips to uint8 in its workers "
            f"(RRC {cfg.img_size}), collates alike and normalises each batch in the main "
            f"process ({cfg.main_threads} torch thread(s)); pinned memory: "
            f"{'yes (a GPU is present)' if _pin() else 'no (no GPU)'}; {cfg.repeats} "
            f"interleaved repeats after a warm-up; page cache {cfg.cache} "
            + (
                "(every file dropped from it before each epoch)"
                if cfg.cache == "cold"
                else "(the files stay cached)"
            ),
            f"shard writing: {cfg.images / self.write_s:.0f} images/s, "
            f"{mb / self.write_s:.1f} MB/s ({cfg.samples_per_shard} samples per shard)",
        ]
        for key, name in LOADERS.items():
            spread = ", ".join(f"{r:.0f}" for r in self.img_s[key])
            cpu = statistics.median(self.cpu_ms[key])
            out.append(
                f"{name:50s} {statistics.median(self.img_s[key]):7.1f} images/s, "
                f"CPU {cpu:.2f} ms/image  [{spread}]"
            )
        costs = self.costs_ms
        out.append(
            "per image, one process (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
        )
        main = costs[WEBDATASET_MAIN_STEP]
        summed = {
            key: sum(costs[k] for k in steps)
            for key, steps in (
                ("ours", WEBDATASET_WORKER_STEPS),
                ("webloader", WEBLOADER_STEPS),
                ("imagefolder", IMAGEFOLDER_STEPS),
            )
        }
        out.append(
            "per image, summed (ms): "
            + ", ".join(f"{key} {ms:.2f}" for key, ms in summed.items())
            + f" in a worker, each + {main:.2f} in the main process"
        )
        for library in LIBRARY_LOADERS:
            out.append(
                f"ours/{library} images/s (median of paired repeats): "
                f"{self.paired_ratio('ours', [library]):.2f}"
            )
        out.append(f"ours/best library path images/s ratio: {self.ratio:.2f}")
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


def _epoch_rate(
    batches: Iterable[Any], pids: Callable[[], list[int]], per_batch: Callable[[Tensor], Tensor]
) -> tuple[float, float]:
    """Images/s of one epoch, and the CPU milliseconds per image of this process and of the
    loader's workers (`pids()`, alive across epochs, so read from /proc)."""
    cpu_start, start = _cpu_s(pids()), time.perf_counter()
    count, staging = 0, None
    for images, labels in batches:
        images = per_batch(images)
        # Use every batch as a training step's host-to-device copy does: read it once.
        if staging is None:
            staging = torch.empty_like(images)
        staging[: len(images)].copy_(images)
        count += len(labels)
    elapsed, cpu = time.perf_counter() - start, _cpu_s(pids()) - cpu_start
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


def _cpu_s(pids: list[int]) -> float:
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return own + (processes_cpu_seconds(pids) or math.nan)


def _pin() -> bool:
    """Pinned host memory where a GPU would receive the batches, as a training run has it."""
    return torch.cuda.is_available()


def _per_image_ms(step: Callable[[Any], Any], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        step(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def _per_batched_image_ms(step: Callable[[Any], Any], batches: list[Any]) -> float:
    return _per_image_ms(step, batches) * len(batches) / sum(len(b) for b in batches)


def run_bench(cfg: BenchConfig, root: Path | None = None) -> BenchResult:
    """Make the data under `root` (a temporary folder when None) and time the loaders."""
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
        assert isinstance(tf.train, SplitTransform)
        with _Loaders(cfg, tree, shardset, tf.train) as loaders:
            img_s, cpu_ms = _time_loaders(cfg, loaders, [*paths, *shard_paths(shardset)])
        costs = _cost_breakdown(paths[:64], shard_dir, tf.train, cfg.batch_size)
    return BenchResult(cfg, image_bytes, write_s, img_s, cpu_ms, costs)


def shard_paths(shardset: ShardSet) -> list[Path]:
    return [Path(s.path) for s in shardset.shards]


def _open_image(source: str | IO[bytes]) -> Image.Image:
    """An image decoded whole, in RGB: what every timed loader does with a JPEG."""
    image = Image.open(source)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _webdataset_sample(per_image: Callable[[Any], Tensor], sample: dict[str, Any]) -> tuple:
    return per_image(_open_image(io.BytesIO(sample["jpg"]))), int(sample["cls"])


class _Loaders:
    """The timed loaders, each kept from epoch to epoch (persistent workers), as a training run
    keeps its own: ours (`TrainEpoch` in a `WorkerPool`), webdataset's `WebLoader` over the same
    shards, and torch's `DataLoader` over the ImageFolder. All three decode, crop, collate and
    normalise alike (`_open_image`, the transform's `per_image` in the workers, `_collate`, its
    `per_batch` in the main process), so what differs is the worker pool and the reader."""

    def __init__(
        self, cfg: BenchConfig, tree: Path, shardset: ShardSet, transform: SplitTransform
    ) -> None:
        self.cfg, self.shardset, self.transform = cfg, shardset, transform
        self.pool = WorkerPool()
        common: dict[str, Any] = dict(
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=_pin()
        )
        folder = ImageFolder(str(tree), transform=transform.per_image, loader=_open_image)
        self.imagefolder = DataLoader(
            folder,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(cfg.seed),
            **common,
        )
        urls = [str(p) for p in shard_paths(shardset)]
        pipeline = (
            wds.WebDataset(
                urls,
                shardshuffle=len(urls),
                seed=cfg.seed,
                workersplitter=wds.split_by_worker,
                nodesplitter=wds.single_node_only,
                empty_check=False,
            )
            .shuffle(cfg.samples_per_shard)
            .map(functools.partial(_webdataset_sample, transform.per_image))
            .batched(cfg.batch_size, collation_fn=_collate, partial=False)
        )
        self.webloader = wds.WebLoader(pipeline, batch_size=None, **common)

    def __enter__(self) -> _Loaders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()
        for loader in (self.imagefolder, _data_loader(self.webloader)):
            if loader._iterator is not None:  # persistent workers: stop them now
                loader._iterator._shutdown_workers()

    def epoch(self, name: str, epoch: int) -> tuple[float, float]:
        """One epoch of the loader `name`: (images/s, CPU ms per image)."""
        if name == "ours":
            batches: Iterable[Any] = TrainEpoch(
                self.shardset,
                rank=0,
                world_size=1,
                epoch=epoch,
                seed=self.cfg.seed,
                batch_size=self.cfg.batch_size,
                shuffle_buffer=self.cfg.samples_per_shard,
                transform=self.transform,
                loader_workers=self.cfg.workers,
                pool=self.pool,
            )  # normalised by TrainEpoch itself, in this process
            return _epoch_rate(batches, lambda: self.pool.pids, lambda images: images)
        loader = getattr(self, name)
        workers = _data_loader(loader)
        return _epoch_rate(loader, lambda: _loader_pids(workers), self.transform.per_batch)


def _data_loader(loader: Any) -> DataLoader:
    """The DataLoader itself: a WebLoader wraps one as its pipeline's first stage."""
    return loader if isinstance(loader, DataLoader) else loader.pipeline[0]


def _loader_pids(loader: DataLoader) -> list[int]:
    """A DataLoader's live worker processes (its persistent iterator's; private, bench only)."""
    iterator = loader._iterator
    return [w.pid for w in getattr(iterator, "_workers", [])] if iterator is not None else []


def _time_loaders(
    cfg: BenchConfig, loaders: _Loaders, files: list[Path]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images/s and CPU ms per image of each loader per repeat, after a warm-up epoch of
    each; each repeat runs them back to back, the order rotating from repeat to repeat."""
    names = list(LOADERS)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.main_threads)
    try:
        for name in names:  # warm-up: page cache, imports, workers started
            loaders.epoch(name, 0)
        img_s: dict[str, list[float]] = {name: [] for name in names}
        cpu_ms: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(1, cfg.repeats + 1):
            # Rotate which goes first, so drifts in machine load hit all alike.
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                if cfg.cache == "cold":
                    drop_from_page_cache(files)
                rate, cpu = loaders.epoch(name, repeat)
                img_s[name].append(rate)
                cpu_ms[name].append(cpu)
    finally:
        torch.set_num_threads(threads)
    return img_s, cpu_ms


def _cost_breakdown(
    paths: list[Path], shard_dir: Path, transform: SplitTransform, batch_size: int
) -> dict[str, float]:
    """Milliseconds per image of each step, in one process with one torch thread (as in a
    DataLoader worker): what either loader pays per image."""
    shards = read_split(shard_dir, "train").shards
    encoded = [p.read_bytes() for p in paths]

    def decode(data: bytes) -> Image.Image:  # as every timed loader: RGB needs no conversion
        return _open_image(io.BytesIO(data))

    decoded = [decode(b) for b in encoded]

    def tar_ms() -> float:  # webdataset's reader, grouped into samples as the loader does
        start, count = time.perf_counter(), 0
        for shard in shards:
            with open(shard.path, "rb") as stream:
                count += sum(1 for _ in _group(_tar_members(stream), shard.path))
        return (time.perf_counter() - start) / count * 1e3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pixels = [transform.per_image(image) for image in decoded]
        uint8_batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
        collated = [_collate([(p, 0) for p in batch])[0] for batch in uint8_batches]
        return {
            "open+read file": _per_image_ms(lambda p: p.read_bytes(), paths),
            "tar sample": tar_ms(),
            "sha256 check against the manifest": checksum_cost(encoded),
            "decode JPEG": _per_image_ms(decode, encoded),
            "crop+resize+flip": _per_image_ms(transform.per_image, decoded),
            "normalise a collated batch": _per_batched_image_ms(transform.per_batch, collated),
            "uint8 batch into new shared memory": _per_batched_image_ms(
                _shared_collate, uint8_batches
            ),
        }
    finally:
        torch.set_num_threads(threads)


def _shared_collate(images: list[torch.Tensor]) -> torch.Tensor:
    """A batch collated, then moved into new shared memory, as a DataLoader worker's batch is
    when it is sent (a tensor not yet in shared memory is copied there)."""
    return _collate([(p, 0) for p in images])[0].share_memory_()


def bench_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab data bench`: flags from `BenchConfig`'s fields, then the bench's lines; the last
    is `ours/best library path images/s ratio: X.XX`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark our WebDataset loader against webdataset's WebLoader and torch's "
        "DataLoader over an ImageFolder (persistent workers) on the same JPEGs (an "
        "ImageNet-like tree made in a temporary folder, or under --root).",
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
