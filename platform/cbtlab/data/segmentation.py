"""Semantic segmentation data: ADE20K (official `ADEChallengeData2016` layout) into WebDataset
shards of image + mask, a generated dataset in the same layout, and the shards' reader.

Layout read (ADE20K's, and what `write_shapes_layout` generates):

    ADEChallengeData2016/images/{training,validation}/NAME.jpg
    ADEChallengeData2016/annotations/{training,validation}/NAME.png   (0 = unlabelled, 1..n)

Shards are built as every dataset's (`cbtlab.data.build.build_shards`, from `ADE20KSource`):
planned up front, written atomically, resumable, into a folder or s3://, in this process, a pool
of processes (`cbtlab data ade20k --workers`) or Ray tasks (`build_shards.py --source ade20k`).
Every sample is `{key}.jpg` (the image's own bytes), `{key}.cls` and `{key}.seg.png`, the mask
as 8-bit PNG with classes 0..n-1 and 255 for pixels never scored (ADE20K's label 0; its class c
becomes c - 1, as mmseg's `reduce_zero_label`). The card is the classification shards' one, so
`read_split`, `open_split` and the data hash serve both: each manifest row's label (and `cls`)
is the mask's most frequent class, its sha256 covers image and mask, and `extra` holds
`task: "segmentation"`, `members`, `ignore_index`, the normalisation (ImageNet's, which the
encoders were pretrained with) and the source.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cbtlab.data.build import BuildError, build_shards
from cbtlab.data.shards import read_split
from cbtlab.data.sources import Record, Source, SourceError, safe_key

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
SHAPES_FORMAT_VERSION = 2  # 2: built by build_shards (a cls member, class names, shuffled)


class SegmentationDataError(SourceError):
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
        raise SegmentationDataError(f"no {images_dir}: expected the ADEChallengeData2016 layout")
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


class ADE20KSource(Source):
    """A dataset in the ADEChallengeData2016 layout as a `Source` of `build_shards`: each
    sample's image and mask (converted by `convert_mask`, checked as its shard is written), the
    manifest's label its mask's most frequent scored class. `limit` > 0 keeps the first that
    many samples of each split. Class names come from the release's `objectInfo150.txt` (its
    `Name` column, first synonym) where present, else `class_<label>` by the masks' label."""

    kind = "ade20k"
    members = (MASK_KEY,)
    statistics = (IMAGENET_MEAN, IMAGENET_STD)

    def __init__(
        self, root: Path | str, *, num_classes: int = ADE20K_CLASSES, limit: int = 0,
        name: str = "",
    ) -> None:  # fmt: skip
        if num_classes < 1 or num_classes > IGNORE_INDEX:
            raise SourceError(f"num_classes must be within 1..{IGNORE_INDEX}, got {num_classes}")
        self.root = layout_root(Path(root))
        if not (self.root / "images").is_dir():
            raise SegmentationDataError(
                f"no {self.root / 'images'}: expected the ADEChallengeData2016 layout"
            )
        self.name = name or self.kind
        self.limit = limit
        self.class_names = _class_names(self.root, num_classes)
        self.split_origin = dict(SPLIT_DIRS)

    def records(self) -> dict[str, list[Record]]:
        records: dict[str, list[Record]] = {}
        for split in SPLIT_DIRS:
            pairs = ade20k_pairs(self.root, split)
            records[split] = [
                Record(
                    safe_key(pair.key), 0, split, str(pair.image.relative_to(self.root)), "jpg",
                    pair.image.stat().st_size + pair.mask.stat().st_size, members=1,
                )
                for pair in (pairs[: self.limit] if self.limit else pairs)
            ]  # fmt: skip
        return records

    def read(self, record: Record) -> bytes:
        return (self.root / record.ref).read_bytes()

    def mask_path(self, record: Record) -> Path:
        return self.root / "annotations" / SPLIT_DIRS[record.split] / f"{Path(record.ref).stem}.png"

    def annotate(self, record: Record) -> tuple[int, tuple[tuple[str, bytes], ...]]:
        mask = convert_mask(self.mask_path(record), self.num_classes)
        scored = mask[mask != IGNORE_INDEX]
        label = int(np.bincount(scored).argmax()) if scored.size else 0
        return label, ((MASK_KEY, _png(mask)),)

    def build_spec(self) -> dict[str, Any]:
        # (the class names too: kept shards' manifest rows carry them)
        return {"class_names": list(self.class_names), "mask_format": MASK_FORMAT_VERSION}

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "task": "segmentation", "ignore_index": IGNORE_INDEX, "mask_ext": MASK_KEY,
        }  # fmt: skip


MASK_FORMAT_VERSION = 1  # how a mask is stored; a change rewrites the shards of earlier builds
# The release's class table: a header `Idx Ratio Train Val Name`, then a row per class.
CLASS_INFO = "objectInfo150.txt"


def _class_names(root: Path, num_classes: int) -> tuple[str, ...]:
    """The release's class names (first synonym of each), or `class_<label>` for each label."""
    names = [f"class_{c + 1}" for c in range(num_classes)]
    try:
        lines = (root / CLASS_INFO).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return tuple(names)
    header = lines[0].split() if lines else []
    if "Idx" in header and header[-1:] == ["Name"]:
        idx, col = header.index("Idx"), len(header) - 1
        for line in lines[1:]:  # tab-separated; names may hold spaces ("chest of drawers")
            fields = line.split("\t") if "\t" in line else line.split(None, col)
            if len(fields) > max(idx, col) and fields[idx].strip().isdigit():
                label = int(fields[idx])
                if 1 <= label <= num_classes:
                    names[label - 1] = fields[col].split(";")[0].strip() or names[label - 1]
    return tuple(names)


def write_segmentation_shards(
    source: Path,
    out_dir: Path | str,
    *,
    name: str = "ade20k",
    num_classes: int = ADE20K_CLASSES,
    samples_per_shard: int = 256,
    limit: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> Path | str:
    """Shard a dataset in the ADE20K layout (`ADE20KSource`) into `out_dir`, a folder or an
    s3:// URL, with `build_shards` in `workers` processes of this machine; returns `out_dir`.

    As every build, it resumes: a build stopped half-way (interrupted, or by a bad mask, which
    stops it naming the file) run again keeps the shards it finished."""
    build_shards(
        ADE20KSource(source, num_classes=num_classes, limit=limit, name=name),
        out_dir,
        samples_per_shard=samples_per_shard,
        local=True,
        workers=workers,
        progress=progress,
    )
    return out_dir


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
    as ADE20K's boundaries often are, and the class table (`CLASS_INFO`: background, red disc,
    green square, ...) as the release's. Returns the layout's folder."""
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
    names = ["background"] + [
        f"{colour} {kind}" for colour, kind in zip(_COLOUR_NAMES, _SHAPE_KINDS, strict=True)
    ]
    table = ["Idx\tRatio\tTrain\tVal\tName"] + [
        f"{c}\t0\t0\t0\t{names[c - 1]}" for c in range(1, num_classes + 1)
    ]
    (base / CLASS_INFO).write_text("\n".join(table) + "\n")
    return base


# Per class from 2: a base colour and a shape.
_SHAPE_KINDS = ("disc", "square", "triangle", "disc", "square")
_SHAPE_COLOURS = ((220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 30), (200, 50, 200))
_COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta")


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
    parser.add_argument(
        "--output", required=True, help="the shard folder to write, or an s3:// URL"
    )
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
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    source, name = args.input, "ade20k"
    if args.generate:
        args.num_classes, name = 4, SHAPES_NAME
        if "://" in args.output:
            parser.error("--generate writes its source beside the shards: give a local --output")
        source = write_shapes_layout(Path(args.output) / "source").parent
    elif source is None:
        parser.error("--input: give the folder holding ADEChallengeData2016 (or --generate)")
    try:
        result = build_shards(
            ADE20KSource(source, num_classes=args.num_classes, limit=args.limit, name=name),
            args.output, samples_per_shard=args.samples_per_shard, local=True,
            workers=args.workers, progress=not args.quiet,
        )  # fmt: skip
    except ValueError as exc:  # the source (a SegmentationDataError names the file) or a setting
        kept = "shards finished before it are kept: run again to go on"
        print(f"error: {exc}\n({kept})", file=sys.stderr)
        return 1
    except (BuildError, OSError) as exc:
        resume = "finished shards are kept: run the same command to resume"
        print(f"error: {exc}\n{resume}", file=sys.stderr)
        return 1
    counts = result.num_samples
    print(
        f"{result.location}: {counts['train']} training images, {counts['val']} validation "
        f"images, {args.num_classes} classes; {len(result.written)} shards written, "
        f"{len(result.skipped)} already complete"
    )
    return 0
