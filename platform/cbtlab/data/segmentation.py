"""Semantic segmentation data: ADE20K (official `ADEChallengeData2016` layout) into WebDataset
shards of image + mask, a generated dataset in the same layout, and the shards' reader.

Layout read (ADE20K's, and what `write_shapes_layout` generates):

    ADEChallengeData2016/images/{training,validation}/NAME.jpg
    ADEChallengeData2016/annotations/{training,validation}/NAME.png   (0 = unlabelled, 1..n)

Shards: every sample is `{key}.jpg` (the image's own bytes) and `{key}.seg.png`, the mask as
8-bit PNG with classes 0..n-1 and 255 for pixels never scored (ADE20K's label 0; its class c
becomes c - 1, as mmseg's `reduce_zero_label`). The card (`cbtlab.data.shards.write_card`) is
the classification shards' one, so `read_split`, `open_split` and the data hash serve both:
each manifest row's label is the mask's most frequent class, its sha256 covers image and mask,
and `extra` holds `task: "segmentation"`, `ignore_index`, the normalisation and the source.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cbtlab.data.shards import ShardInfo, open_tar_writer, read_split, shard_name, write_card

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
ADE_DIR = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
MASK_KEY = "seg.png"
# ImageNet's statistics: the encoders' pretraining normalisation (Segmenter's too).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHAPES_NAME = "shapes-seg"
SHAPES_FORMAT_VERSION = 1


class SegmentationDataError(ValueError):
    """A source sample that cannot become a shard sample; the message names the file."""


@dataclass(frozen=True)
class SourcePair:
    key: str
    image: Path
    mask: Path


def layout_root(root: Path) -> Path:
    """`root` itself or its `ADEChallengeData2016` folder, whichever holds `images/`."""
    root = Path(root)
    return root / ADE_DIR if (root / ADE_DIR / "images").is_dir() else root


def ade20k_pairs(root: Path, split: str) -> list[SourcePair]:
    """The (image, mask) pairs of `split` ("train" or "val"), sorted by name. Raises
    `SegmentationDataError` naming an image without its mask (or a mask without its image)."""
    base = layout_root(root)
    images_dir = base / "images" / SPLIT_DIRS[split]
    masks_dir = base / "annotations" / SPLIT_DIRS[split]
    if not images_dir.is_dir():
        raise FileNotFoundError(f"no {images_dir}: expected the ADEChallengeData2016 layout")
    images = {p.stem: p for p in images_dir.glob("*.jpg")}
    masks = {p.stem: p for p in masks_dir.glob("*.png")} if masks_dir.is_dir() else {}
    for stem in sorted(images.keys() - masks.keys()):
        raise SegmentationDataError(
            f"{images[stem]}: image without its mask (expected {masks_dir / (stem + '.png')})"
        )
    for stem in sorted(masks.keys() - images.keys()):
        raise SegmentationDataError(f"{masks[stem]}: mask without its image in {images_dir}")
    return [SourcePair(stem, images[stem], masks[stem]) for stem in sorted(images)]


def convert_mask(path: Path, num_classes: int) -> np.ndarray:
    """ADE20K labels (0 unlabelled, 1..n) -> 0..n-1 with IGNORE_INDEX for 0, uint8 (H, W).
    Raises `SegmentationDataError` naming the file for a value above `num_classes` or a mask
    that is not one channel of integers."""
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise SegmentationDataError(f"{path}: mask mode {mask.mode}, expected one channel")
        labels = np.asarray(mask).astype(np.int64)
    top = int(labels.max()) if labels.size else 0
    if top > num_classes or int(labels.min()) < 0:
        raise SegmentationDataError(
            f"{path}: mask value {top} exceeds the {num_classes} classes (0 is unlabelled)"
        )
    return np.where(labels == 0, IGNORE_INDEX, labels - 1).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


BUILD_DIR = ".build"  # per-shard build records in the shard folder while a build runs
SHARD_FORMAT_VERSION = 1  # what a shard holds; a change rewrites shards left by a stopped build


def write_segmentation_shards(
    source: Path,
    out_dir: Path,
    *,
    name: str = "ade20k",
    num_classes: int = ADE20K_CLASSES,
    samples_per_shard: int = 256,
    limit: int = 0,
    workers: int = 1,
) -> Path:
    """Shard a dataset in the ADE20K layout into `out_dir` (train and val, with the card);
    `limit` > 0 keeps the first that many samples of each split (a quick look). Returns
    `out_dir`. Every mask is checked (see `convert_mask`) before its shard is written.

    Shards are written by `workers` processes (1: in this one), each atomically (a temporary
    file renamed into place) and followed by its build record (`BUILD_DIR`), so that a build
    stopped half-way (interrupted, or a bad mask, which stops it naming the file) goes on from
    the shards it finished: a shard is kept when its record matches its plan (the sample
    files, their sizes and the class count) and its size. The records go once the card is
    written; shard files of an earlier plan that this one lacks are removed."""
    out_dir = Path(out_dir)
    (out_dir / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    jobs = []
    for split in ("train", "val"):
        pairs = ade20k_pairs(source, split)
        pairs = pairs[:limit] if limit else pairs
        jobs += [
            _ShardJob(split, i, tuple(pairs[start : start + samples_per_shard]), num_classes)
            for i, start in enumerate(range(0, len(pairs), samples_per_shard))
        ]
    results = {job.name: _finished(out_dir, job) for job in jobs}
    todo = [job for job in jobs if results[job.name] is None]
    if len(todo) < len(jobs):
        log.info(
            "%s: %d of %d shards already written, kept", out_dir, len(jobs) - len(todo), len(jobs)
        )
    results.update(_run_jobs(todo, out_dir, workers))
    splits = {
        split: [results[j.name].info for j in jobs if j.split == split] for split in SPLIT_DIRS
    }
    rows = [row for job in jobs for row in results[job.name].rows]
    write_card(
        out_dir,
        name,
        splits,
        rows,
        num_classes=num_classes,
        image_ext="jpg",
        extra={
            "task": "segmentation",
            "ignore_index": IGNORE_INDEX,
            "mask_ext": MASK_KEY,
            "channels": 3,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "source": str(source),
        },
    )
    planned = {job.name for job in jobs}
    for stale in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name.split("-")[0] in SPLIT_DIRS and stale.name not in planned:
            stale.unlink()
    shutil.rmtree(out_dir / BUILD_DIR, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class _ShardJob:
    """One shard to write: its split, index and (image, mask) pairs."""

    split: str
    index: int
    pairs: tuple[SourcePair, ...]
    num_classes: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def digest(self) -> str:
        """Changes whenever the shard's bytes could: its samples' files, their sizes, the
        class count and the format."""
        spec = [SHARD_FORMAT_VERSION, self.name, self.num_classes] + [
            [p.key, str(p.image), p.image.stat().st_size, str(p.mask), p.mask.stat().st_size]
            for p in self.pairs
        ]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


@dataclass
class _ShardResult:
    info: ShardInfo
    rows: list[dict[str, Any]]
    digest: str


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / BUILD_DIR / f"{name}.json"


def _finished(out_dir: Path, job: _ShardJob) -> _ShardResult | None:
    """The shard's result when it is written and from this plan, else None."""
    try:
        record = json.loads(_record_path(out_dir, job.name).read_text())
        result = _ShardResult(ShardInfo(**record["info"]), record["rows"], record["digest"])
        size = (out_dir / job.name).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if result.digest != job.digest() or size != result.info.num_bytes:
        return None
    return result


def _run_jobs(jobs: list[_ShardJob], out_dir: Path, workers: int) -> dict[str, _ShardResult]:
    """Write the shards of `jobs`, in `workers` processes where more than one; the first
    error (a bad mask) stops the build once the shards being written are done."""
    if workers <= 1 or len(jobs) <= 1:
        return {job.name: _write_shard(job, out_dir) for job in jobs}
    from concurrent.futures import ProcessPoolExecutor

    out: dict[str, _ShardResult] = {}
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        futures = [pool.submit(_write_shard, job, out_dir) for job in jobs]
        try:
            for job, future in zip(jobs, futures, strict=True):
                out[job.name] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def _write_shard(job: _ShardJob, out_dir: Path) -> _ShardResult:
    """Write one shard atomically, then its build record."""
    path = out_dir / job.name
    tmp = path.with_name(f".{job.name}.{os.getpid()}.tmp")
    rows: list[dict[str, Any]] = []
    try:
        with open(tmp, "wb") as file:
            writer = open_tar_writer(file)
            try:
                for pair in job.pairs:
                    rows.append(_write_pair(writer, pair, job))
            finally:
                writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    info = ShardInfo(path.name, len(job.pairs), path.stat().st_size)
    result = _ShardResult(info, rows, job.digest())
    record = {"info": asdict(result.info), "rows": rows, "digest": result.digest}
    _record_path(out_dir, job.name).write_text(json.dumps(record))
    return result


def _write_pair(writer: Any, pair: SourcePair, job: _ShardJob) -> dict[str, Any]:
    """One sample into the shard; its manifest row."""
    image = pair.image.read_bytes()
    mask = convert_mask(pair.mask, job.num_classes)
    mask_bytes = _png(mask)
    writer.write({"__key__": pair.key, "jpg": image, MASK_KEY: mask_bytes})
    scored = mask[mask != IGNORE_INDEX]
    return {
        "key": pair.key,
        "label": int(np.bincount(scored).argmax()) if scored.size else 0,
        "split": job.split,
        "shard": job.name,
        "size": len(image) + len(mask_bytes),
        "sha256": hashlib.sha256(image + mask_bytes).hexdigest(),
    }


def write_shapes_layout(
    root: Path,
    *,
    num_train: int = 96,
    num_val: int = 24,
    size: int = 64,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Generate a small dataset in the ADE20K layout under `root/ADEChallengeData2016`: textured
    backgrounds (class 1) with 1-3 discs, squares and triangles (classes 2..num_classes, one
    colour family and shape per class), each shape outlined by a 1-pixel unlabelled ring (0),
    as ADE20K's boundaries often are. Returns the layout's folder."""
    if not 2 <= num_classes <= 6:
        raise ValueError(f"the shapes dataset has 2..6 classes, got {num_classes}")
    base = Path(root) / ADE_DIR
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        images_dir = base / "images" / SPLIT_DIRS[split]
        masks_dir = base / "annotations" / SPLIT_DIRS[split]
        images_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = _shapes_sample(rng, size, num_classes)
            stem = f"ADE_{SPLIT_DIRS[split][:5]}_{index + 1:08d}"
            image.save(images_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(mask).save(masks_dir / f"{stem}.png")
    return base


# Per class from 2: a base colour and a shape.
_SHAPE_KINDS = ("disc", "square", "triangle", "disc", "square")
_SHAPE_COLOURS = ((220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 30), (200, 50, 200))


def _shapes_sample(
    rng: np.random.Generator, size: int, num_classes: int
) -> tuple[Image.Image, np.ndarray]:
    noise = rng.integers(60, 140, size=(size // 4, size // 4, 3), dtype=np.uint8)
    texture = Image.fromarray(noise).resize((size, size), Image.Resampling.BILINEAR)
    image = texture.copy()
    mask = Image.new("L", (size, size), 1)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(2, num_classes + 1))
        radius = int(rng.integers(size // 8, size // 4))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
        colour = tuple(
            int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _SHAPE_COLOURS[cls - 2]
        )
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        kind = _SHAPE_KINDS[cls - 2]
        for target, fill, outline in ((draw, colour, colour), (draw_mask, cls, 0)):
            if kind == "disc":
                target.ellipse(box, fill=fill, outline=outline)
            elif kind == "square":
                target.rectangle(box, fill=fill, outline=outline)
            else:
                points = [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)]
                target.polygon(points, fill=fill, outline=outline)
    return image, np.asarray(mask, dtype=np.uint8)


def ensure_shapes(
    cache_dir: Path, *, num_classes: int = 4, size: int = 64, num_train: int = 96,
    num_val: int = 24, samples_per_shard: int = 32, seed: int = 0,
) -> Path:  # fmt: skip
    """The shards of the generated shapes dataset for these parameters, built on first use
    (under a file lock, into a temporary folder renamed into place, as the digits)."""
    tag = f"c{num_classes}-s{size}-n{num_train}-{num_val}-p{samples_per_shard}-seed{seed}"
    root = Path(cache_dir) / f"{SHAPES_NAME}-v{SHAPES_FORMAT_VERSION}-{tag}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for split in ("train", "val"):
                read_split(root, split)
            return root
        except FileNotFoundError:
            pass
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            source = write_shapes_layout(
                tmp / "source", num_train=num_train, num_val=num_val, size=size,
                num_classes=num_classes, seed=seed,
            )  # fmt: skip
            shards = tmp / "shards"
            write_segmentation_shards(
                source, shards, name=SHAPES_NAME, num_classes=num_classes,
                samples_per_shard=samples_per_shard,
            )  # fmt: skip
            if root.exists():
                shutil.rmtree(root)
            shards.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def iter_shard_samples(urls: list[str]) -> Iterator[tuple[str, Image.Image, np.ndarray]]:
    """(key, RGB image, mask) of every sample in the shards, in order (no augmentation)."""
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield decode_sample(sample)


def decode_sample(sample: dict[str, Any]) -> tuple[str, Image.Image, np.ndarray]:
    """A raw WebDataset sample (bytes) -> (key, RGB image, uint8 mask)."""
    key = sample["__key__"]
    image_bytes = sample.get("jpg") or sample.get("png")
    if image_bytes is None or MASK_KEY not in sample:
        raise SegmentationDataError(f"sample {key}: expected an image and {MASK_KEY}")
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    mask = np.asarray(Image.open(io.BytesIO(sample[MASK_KEY])), dtype=np.uint8)
    if mask.shape != (image.height, image.width):
        raise SegmentationDataError(
            f"sample {key}: mask {mask.shape[1]}x{mask.shape[0]} and image "
            f"{image.width}x{image.height} differ"
        )
    return key, image, mask


def ade20k_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab data ade20k`: shard ADE20K (or generate the shapes dataset in its layout)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write WebDataset shards of image + mask from a dataset in the official "
        "ADEChallengeData2016 layout (masks 0 = unlabelled, 1..N; stored as 0..N-1, 255 "
        "ignored), or with --generate, first write the shapes dataset in that layout.",
    )
    parser.add_argument("--input", type=Path, help="the folder holding ADEChallengeData2016")
    parser.add_argument("--output", type=Path, required=True, help="the shard folder to write")
    parser.add_argument("--num-classes", type=int, default=ADE20K_CLASSES)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0, help="first N samples per split only")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes writing shards (default: this machine's CPUs); a stopped build run "
        "again keeps the shards it finished",
    )
    parser.add_argument(
        "--generate", action="store_true", help="generate the shapes dataset (4 classes) first"
    )
    args = parser.parse_args(argv)
    source, name = args.input, "ade20k"
    if args.generate:
        args.num_classes, name = 4, SHAPES_NAME
        source = write_shapes_layout(args.output / "source").parent
    elif source is None:
        parser.error("--input: give the folder holding ADEChallengeData2016 (or --generate)")
    try:
        out = write_segmentation_shards(
            source, args.output, name=name, num_classes=args.num_classes,
            samples_per_shard=args.samples_per_shard, limit=args.limit, workers=args.workers,
        )  # fmt: skip
    except (SegmentationDataError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    card = read_split(out, "train")
    print(
        f"{out}: {card.num_samples} training images in {len(card.shards)} shards, "
        f"{read_split(out, 'val').num_samples} validation images, {args.num_classes} classes"
    )
    return 0
