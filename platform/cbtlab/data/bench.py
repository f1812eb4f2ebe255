"""Loader throughput: our WebDataset loader against torchvision's ImageFolder, side by side.

One run makes an ImageNet-like JPEG ImageFolder tree (smooth random colour fields with
photo-like noise, 500 x 375 by default), writes it as WebDataset shards with
`shards.write_split` / `write_card` (timed: shard-writing images/s and MB/s), then times whole
epochs of (a) `TrainEpoch` over the shards and (b) `ImageFolder` + `DataLoader` over the files:
the same JPEGs, the same transform object (the paper's RRC + flip + normalise), the same number
of worker processes and batch size. One warm-up epoch each, then repeats that alternate which
loader goes first; the ratio is the median of the repeats' paired ratios.
A per-image cost breakdown in the training process says where the time goes.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cbtlab.data.shards import Sample, read_split, write_card, write_split
from cbtlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

EXTENSIONS = (".jpg", ".jpeg")


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
    repeats: int = 5
    seed: int = 0


@dataclass
class BenchResult:
    config: BenchConfig
    image_bytes: int
    write_s: float
    webdataset_img_s: list[float]
    imagefolder_img_s: list[float]
    costs_ms: dict[str, float]

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
            f"+ normalise; {cfg.repeats} interleaved repeats after a warm-up",
            f"shard writing: {cfg.images / self.write_s:.0f} images/s, "
            f"{mb / self.write_s:.1f} MB/s ({cfg.samples_per_shard} samples per shard)",
        ]
        for name, rates in (
            ("webdataset (TrainEpoch)", self.webdataset_img_s),
            ("imagefolder (torchvision)", self.imagefolder_img_s),
        ):
            spread = ", ".join(f"{r:.0f}" for r in rates)
            out.append(f"{name:27s} {statistics.median(rates):7.1f} images/s  [{spread}]")
        out.append(
            "per image, one process (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in self.costs_ms.items())
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


def _epoch_rate(batches: Iterable[Any]) -> float:
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    return count / (time.perf_counter() - start)


def _per_image_ms(step: Callable[[Any], Any], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        step(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def run_bench(cfg: BenchConfig, root: Path | None = None) -> BenchResult:
    """Make the data under `root` (a temporary folder when None) and time both loaders."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from cbtlab.data.loader import TrainEpoch

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
        folder = ImageFolder(str(tree), transform=tf.train)

        def webdataset_epoch(epoch: int) -> float:
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
                )
            )

        def imagefolder_epoch(epoch: int) -> float:
            generator = torch.Generator().manual_seed(cfg.seed * 1_000 + epoch)
            return _epoch_rate(
                DataLoader(
                    folder,
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    drop_last=True,
                    num_workers=cfg.workers,
                    generator=generator,
                )
            )

        webdataset_epoch(0), imagefolder_epoch(0)  # warm-up: page cache, imports, forks
        rates: dict[str, list[float]] = {"wds": [], "folder": []}
        for repeat in range(1, cfg.repeats + 1):
            # Alternate which goes first, so drifts in machine load hit both alike.
            order = [("wds", webdataset_epoch), ("folder", imagefolder_epoch)]
            for name, run in order if repeat % 2 else order[::-1]:
                rates[name].append(run(repeat))
        costs = _cost_breakdown(paths[:64], shard_dir, tf.train)
    return BenchResult(cfg, image_bytes, write_s, rates["wds"], rates["folder"], costs)


def _cost_breakdown(paths: list[Path], shard_dir: Path, transform: Callable) -> dict[str, float]:
    """Milliseconds per image of each step, in one process with one torch thread (as in a
    DataLoader worker): what either loader pays per image."""
    from cbtlab.data.loader import _read_shards

    shards = read_split(shard_dir, "train").shards
    encoded = [p.read_bytes() for p in paths]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in encoded]

    def decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    def decode_half(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image.width // 2, image.height // 2))
        return image.convert("RGB")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        count = sum(1 for _ in _read_shards(shards))
        tar_ms = (time.perf_counter() - start) / count * 1e3
        return {
            "open+read file": _per_image_ms(lambda p: p.read_bytes(), paths),
            "tar sample": tar_ms,
            "decode JPEG": _per_image_ms(decode, encoded),
            "decode at 1/2 (draft)": _per_image_ms(decode_half, encoded),
            "RRC+flip+normalise": _per_image_ms(transform, decoded),
        }
    finally:
        torch.set_num_threads(threads)
