"""Readers that enumerate the samples of standard on-disk image datasets.

A source lists its samples as `Record`s (key, label, split, where the image is, its byte size)
without reading any image, so that a builder can plan its shards up front; `Source.read` returns
one record's image bytes: the original file bytes for file datasets, a lossless PNG for array
datasets (CIFAR). Splits are named as the training loop reads them, `train` and `val` (plus
`test` where a dataset has a third labelled split); `Source.split_origin` says which part of the
original release each split is.

Layouts (ROOT is `--input`):
  imagefolder  ROOT/train/<class>/*.<ext>; ROOT/val/<class>/*, or a flat ROOT/val/* with a label
               file (`read_label_file`); optional ROOT/test/<class>/*. The class index is the
               position of the folder name in the sorted train class folders, in every split.
  cifar10      ROOT/data_batch_1..5 -> train, test_batch -> val, batches.meta (class names):
               the python pickle release (`cifar-10-batches-py`, also found one level down).
  cifar100     ROOT/train -> train, test -> val, meta (fine labels and `fine_label_names`).
  flowers102   ROOT/jpg/image_XXXXX.jpg, imagelabels.mat (`labels`, 1..102, by image id),
               setid.mat (`trnid` -> train, `valid` -> val, `tstid` -> test).
  pets         ROOT/images/<Breed_name>_<n>.jpg, ROOT/annotations/trainval.txt -> train and
               test.txt -> val, lines `Abyssinian_100 1 1 1` (name, class id 1..37, species,
               breed id); the class names are the image-name prefixes (`Abyssinian`,
               `american_bulldog`).

Keys are unique over the whole dataset and hold only `[A-Za-z0-9_-]`, because WebDataset splits a
member name at its first dot: file datasets use `{split}_{class}_{stem}` (class folders) or the
file stem (flat folders, Flowers, Pets); CIFAR uses `{split}_{index:05d}`.
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

# File extensions an ImageFolder source takes as images, with the name their shard members get.
IMAGE_EXTENSIONS = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".bmp": "bmp",
    ".ppm": "ppm",
    ".pgm": "pgm",
    ".gif": "gif",
    ".tif": "tif",
    ".tiff": "tif",
    ".webp": "webp",
}
IMAGEFOLDER_SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The input is not the dataset layout the source expects; the message names the problem."""


@dataclass(frozen=True)
class Record:
    """One sample as a shard plan knows it, without its image bytes."""

    key: str
    label: int
    split: str
    # Where the image is, relative to the source's root: a file path, or "<batch file>:<row>".
    ref: str
    ext: str
    # The image's size in bytes (for array sources an estimate: the raw pixel count), which
    # sizes shards by bytes; with the sizes of its other members (a mask) where it has some.
    size: int
    # How many members the sample stores beside its image and label (`Source.members`).
    members: int = 0


@dataclass(frozen=True)
class SourceSample:
    key: str
    image: bytes
    ext: str
    label: int
    class_name: str
    split: str


class Source(ABC):
    """A dataset on disk. Sources are small and picklable: Ray tasks receive them whole."""

    kind: str
    name: str
    root: Path
    class_names: tuple[str, ...]
    split_origin: dict[str, str]
    # Members each sample stores beside its image and label (`annotate` gives their bytes), in
    # the order the manifest's sha256 covers them; pixel-aligned with the image (a mask), so the
    # images of such a source are never resized by a build.
    members: ClassVar[tuple[str, ...]] = ()
    # The normalisation its models expect ((mean, std) per RGB channel), which the card records
    # instead of the training images' own statistics; None: measure them.
    statistics: ClassVar[tuple[tuple[float, ...], tuple[float, ...]] | None] = None

    @abstractmethod
    def records(self) -> dict[str, list[Record]]:
        """Every split's records, in a fixed order (sorted file names, or the release's order)."""

    @abstractmethod
    def read(self, record: Record) -> bytes:
        """The image bytes of one record."""

    def annotate(self, record: Record) -> tuple[int, tuple[tuple[str, bytes], ...]]:
        """One record's label and its `members`' bytes, read as its shard is written: a
        classification source has the record's label and no members."""
        return record.label, ()

    def build_spec(self) -> dict[str, Any]:
        """What, beyond the records, shapes the bytes the source gives a shard (a build rewrites
        the shards of an earlier build when it changes); empty for the classification sources."""
        return {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        """What a dataset card records about where its samples came from."""
        return {"source": self.kind, "input": str(self.root), "split_origin": self.split_origin}

    def samples(self, split: str) -> Iterator[SourceSample]:
        records = self.records()
        if split not in records:
            raise KeyError(f"{self.kind} source at {self.root} has no split {split!r}")
        for record in records[split]:
            yield SourceSample(
                key=record.key,
                image=self.read(record),
                ext=record.ext,
                label=record.label,
                class_name=self.class_names[record.label],
                split=split,
            )


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SourceError(f"{what} {path} does not exist or is not a folder")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} {path} is missing")
    return path


def _images_in(folder: Path) -> list[tuple[str, str, int]]:
    """(file name, shard extension, byte size) of the image files directly in `folder`, sorted."""
    found = []
    for entry in sorted(folder.iterdir()):
        ext = IMAGE_EXTENSIONS.get(entry.suffix.lower())
        if ext is not None and entry.is_file():
            found.append((entry.name, ext, entry.stat().st_size))
    return found


class ImageFolderSource(Source):
    """`ROOT/train/<class>/*` plus `val` (class folders or flat with a label file) and `test`."""

    kind = "imagefolder"

    def __init__(
        self, root: Path | str, *, val_labels: Path | str | None = None, name: str = ""
    ) -> None:
        self.root = _require_dir(Path(root).expanduser().resolve(), "input folder")
        train = _require_dir(self.root / "train", "training folder")
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise SourceError(f"{train} holds no class folders (expected {train}/<class>/*.jpg)")
        self.class_names = tuple(classes)
        self.val_labels = Path(val_labels).expanduser().resolve() if val_labels else None
        if self.val_labels is not None:
            _require_file(self.val_labels, "label file")
            _require_dir(self.root / "val", "validation folder")
        self.name = name or self.root.name
        self.split_origin = {s: f"{s}/" for s in IMAGEFOLDER_SPLITS if (self.root / s).is_dir()}

    def records(self) -> dict[str, list[Record]]:
        index = {name: i for i, name in enumerate(self.class_names)}
        splits: dict[str, list[Record]] = {}
        for split in IMAGEFOLDER_SPLITS:
            folder = self.root / split
            if not folder.is_dir():
                continue
            class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
            flat = _images_in(folder)
            if class_dirs and flat:
                raise SourceError(
                    f"{folder} holds both class folders and {len(flat)} images; use one layout"
                )
            if split == "val" and self.val_labels is not None:
                if class_dirs:
                    raise SourceError(
                        f"{folder} has class folders; a label file is only for a flat {folder}"
                    )
                labels = read_label_file(self.val_labels, [f for f, _, _ in flat], self.class_names)
                splits[split] = [
                    Record(safe_key(Path(f).stem), labels[f], split, f"{split}/{f}", ext, size)
                    for f, ext, size in flat
                ]
                continue
            if flat:
                hint = " (pass --val-labels FILE)" if split == "val" else ""
                raise SourceError(f"{folder} holds images but no class folders{hint}")
            records = []
            for class_dir in class_dirs:
                if class_dir.name not in index:
                    raise SourceError(
                        f"class folder {class_dir} is not a class of {self.root / 'train'}"
                    )
                images = _images_in(class_dir)
                if not images and split == "train":
                    raise SourceError(f"class folder {class_dir} holds no images")
                prefix = f"{split}_{class_dir.name}_"
                records += [
                    Record(
                        safe_key(prefix + Path(f).stem),
                        index[class_dir.name],
                        split,
                        f"{split}/{class_dir.name}/{f}",
                        ext,
                        size,
                    )
                    for f, ext, size in images
                ]
            if records:
                splits[split] = records
        return splits

    def read(self, record: Record) -> bytes:
        return (self.root / record.ref).read_bytes()


def read_label_file(path: Path, images: list[str], class_names: tuple[str, ...]) -> dict[str, int]:
    """The label of every image of a flat validation folder, from a label file.

    Formats (a label is a class folder name such as a WordNet id `n01440764`, or an integer:
    the 0-based index into the sorted class folders):
      *.csv   `filename,label` per row; a first row naming no image is a header and skipped;
              the filename may omit its extension and only the label's first word counts, so
              Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`) works as it is.
      other   whitespace-separated `filename label` per line (e.g. Caffe's ImageNet `val.txt`),
              or one `label` per line for the images in sorted file-name order.
    The devkit's `ILSVRC2012_validation_ground_truth.txt` holds 1-based devkit ids in
    `meta.mat` order, not sorted-wnid order: convert it to wnids first.
    Every image needs exactly one label, and every labelled file must exist."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the label file {path}: {exc}") from exc
    index = {name: i for i, name in enumerate(class_names)}
    by_name = {f: f for f in images} | {Path(f).stem: f for f in images}

    def label_of(token: str, where: str) -> int:
        if token in index:
            return index[token]
        if token.isdigit():
            value = int(token)
            if value < len(class_names):
                return value
            raise SourceError(
                f"label {value} at {where} of {path} is out of range 0..{len(class_names) - 1} "
                "(0-based index into the sorted class folders)"
            )
        raise SourceError(f"label {token!r} at {where} of {path} is not a class folder name")

    pairs: list[tuple[str, str, str]] = []  # (file name as written, label, where)
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if rows and rows[0][0].strip() not in by_name:
            rows = rows[1:]  # a header
        for n, row in enumerate(rows, 1):
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"row {n} of {path} is not `filename,label`: {row}")
            pairs.append((row[0].strip(), row[1].split()[0], f"row {n}"))
    else:
        lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        widths = {len(fields) for _, fields in lines}
        if widths == {1}:
            if len(lines) != len(images):
                raise SourceError(
                    f"{path} has {len(lines)} labels, one per line, for {len(images)} images"
                )
            pairs = [
                (name, fields[0], f"line {n}")
                for name, (n, fields) in zip(sorted(images), lines, strict=True)
            ]
        elif widths == {2}:
            pairs = [(fields[0], fields[1], f"line {n}") for n, fields in lines]
        elif lines:
            raise SourceError(
                f"{path} mixes line formats: expected `filename label` or one label per line"
            )
    labels: dict[str, int] = {}
    for written, token, where in pairs:
        name = by_name.get(written) or by_name.get(Path(written).stem)
        if name is None:
            raise SourceError(f"{where} of {path} labels {written!r}, which is not an image")
        if name in labels:
            raise SourceError(f"{where} of {path} labels {written!r} a second time")
        labels[name] = label_of(token, where)
    unlabelled = [f for f in images if f not in labels]
    if unlabelled:
        raise SourceError(
            f"{len(unlabelled)} images have no label in {path}, e.g. {unlabelled[:3]}"
        )
    return labels


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle (written by Python 2: bytes keys) with str keys."""
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise SourceError(f"cannot read the CIFAR batch {path}: {exc}") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


class CifarSource(Source):
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickle release; images become PNG."""

    # kind -> (release folder, {split: batch files}, meta file, label key, class-name key)
    LAYOUTS: ClassVar[dict[str, tuple[str, dict[str, list[str]], str, str, str]]] = {
        "cifar10": (
            "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]},
            "batches.meta",
            "labels",
            "label_names",
        ),
        "cifar100": (
            "cifar-100-python",
            {"train": ["train"], "val": ["test"]},
            "meta",
            "fine_labels",
            "fine_label_names",
        ),
    }
    IMAGE_SHAPE = (3, 32, 32)  # (C, H, W): one row of a batch's `data` holds three planes

    def __init__(self, root: Path | str, *, kind: str = "cifar10", name: str = "") -> None:
        if kind not in self.LAYOUTS:
            raise ValueError(f"unknown CIFAR kind {kind!r}; expected one of {sorted(self.LAYOUTS)}")
        self.kind = kind
        folder, self.batches, meta, self.label_key, names_key = self.LAYOUTS[kind]
        root = _require_dir(Path(root).expanduser().resolve(), "input folder")
        if not (root / meta).is_file() and (root / folder / meta).is_file():
            root = root / folder
        self.root = root
        self.name = name or kind
        names = _unpickle(_require_file(root / meta, f"{kind} meta file")).get(names_key)
        if names is None:
            raise SourceError(f"{root / meta} has no {names_key!r}")
        self.class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        for files in self.batches.values():
            for file in files:
                _require_file(root / file, f"{kind} batch")
        self.split_origin = {split: ", ".join(files) for split, files in self.batches.items()}
        self._cache: dict[str, np.ndarray] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_size": self.IMAGE_SHAPE[1]}

    def __getstate__(self) -> dict[str, Any]:
        # Ray tasks get the source without the decoded batches; each loads what it reads.
        return {**self.__dict__, "_cache": {}}

    def _batch(self, file: str) -> tuple[np.ndarray, list[int]]:
        batch = _unpickle(self.root / file)
        if "data" not in batch or self.label_key not in batch:
            raise SourceError(f"{self.root / file} has no 'data' or {self.label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = [int(x) for x in batch[self.label_key]]
        if data.ndim != 2 or data.shape[1] != int(np.prod(self.IMAGE_SHAPE)):
            raise SourceError(f"{self.root / file}: data has shape {data.shape}, not (N, 3072)")
        if len(labels) != len(data):
            raise SourceError(f"{self.root / file}: {len(data)} images but {len(labels)} labels")
        bad = [x for x in labels if not 0 <= x < self.num_classes]
        if bad:
            raise SourceError(
                f"{self.root / file}: label {bad[0]} is out of range 0..{self.num_classes - 1}"
            )
        return data, labels

    def records(self) -> dict[str, list[Record]]:
        size = int(np.prod(self.IMAGE_SHAPE))
        splits = {}
        for split, files in self.batches.items():
            records = []
            for file in files:
                _, labels = self._batch(file)
                records += [
                    Record(
                        f"{split}_{len(records) + row:05d}", y, split, f"{file}:{row}", "png", size
                    )
                    for row, y in enumerate(labels)
                ]
            splits[split] = records
        return splits

    def read(self, record: Record) -> bytes:
        file, _, row = record.ref.rpartition(":")
        if file not in self._cache:  # a shuffled shard reads every batch of its split
            self._cache[file] = self._batch(file)[0]
        pixels = self._cache[file][int(row)].reshape(self.IMAGE_SHAPE).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")  # (H, W, C)
        return buf.getvalue()


def _flowers_class_names() -> tuple[str, ...]:
    try:  # torchvision ships the names the release itself lacks
        from torchvision.datasets import Flowers102

        names = tuple(Flowers102.classes)
        if len(names) == 102:
            return names
    except (ImportError, AttributeError):
        pass
    return tuple(f"flower_{i:03d}" for i in range(1, 103))


def _loadmat(path: Path, field: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if field not in mat:
        raise SourceError(f"{path} has no {field!r} (has {sorted(k for k in mat if k[0] != '_')})")
    return np.asarray(mat[field]).reshape(-1).astype(np.int64)


class Flowers102Source(Source):
    """Oxford Flowers-102: `jpg/`, `imagelabels.mat`, `setid.mat`."""

    kind = "flowers102"
    SPLITS: ClassVar[dict[str, str]] = {"train": "trnid", "val": "valid", "test": "tstid"}

    def __init__(self, root: Path | str, *, name: str = "") -> None:
        self.root = _require_dir(Path(root).expanduser().resolve(), "input folder")
        _require_dir(self.root / "jpg", "image folder")
        _require_file(self.root / "imagelabels.mat", "label file")
        _require_file(self.root / "setid.mat", "split file")
        self.name = name or self.kind
        self.class_names = _flowers_class_names()
        self.split_origin = {split: f"setid.mat:{field}" for split, field in self.SPLITS.items()}

    def records(self) -> dict[str, list[Record]]:
        labels = _loadmat(self.root / "imagelabels.mat", "labels")  # image id i -> labels[i - 1]
        bad = labels[(labels < 1) | (labels > self.num_classes)]
        if bad.size:
            raise SourceError(
                f"{self.root / 'imagelabels.mat'}: label {bad[0]} is out of range 1..102"
            )
        splits = {}
        for split, field in self.SPLITS.items():
            records = []
            for image_id in _loadmat(self.root / "setid.mat", field).tolist():
                if not 1 <= image_id <= len(labels):
                    raise SourceError(
                        f"{self.root / 'setid.mat'}: {field} lists image {image_id}, but "
                        f"imagelabels.mat labels images 1..{len(labels)}"
                    )
                ref = f"jpg/image_{image_id:05d}.jpg"
                path = _require_file(self.root / ref, "image")
                label = int(labels[image_id - 1]) - 1
                records.append(
                    Record(Path(ref).stem, label, split, ref, "jpg", path.stat().st_size)
                )
            splits[split] = records
        return splits

    def read(self, record: Record) -> bytes:
        return (self.root / record.ref).read_bytes()


class PetsSource(Source):
    """Oxford-IIIT Pets: `images/*.jpg`, `annotations/{trainval,test}.txt`; 37 breeds."""

    kind = "pets"
    SPLITS: ClassVar[dict[str, str]] = {"train": "trainval.txt", "val": "test.txt"}

    def __init__(self, root: Path | str, *, name: str = "") -> None:
        self.root = _require_dir(Path(root).expanduser().resolve(), "input folder")
        _require_dir(self.root / "images", "image folder")
        for file in self.SPLITS.values():
            _require_file(self.root / "annotations" / file, "annotation file")
        self.name = name or self.kind
        self.split_origin = {split: f"annotations/{f}" for split, f in self.SPLITS.items()}
        names: dict[int, str] = {}
        for split in self.SPLITS:
            for image, class_id, where in self._lines(split):
                breed = image.rsplit("_", 1)[0]
                if names.setdefault(class_id, breed) != breed:
                    raise SourceError(
                        f"{where}: class id {class_id} is {breed!r} here but "
                        f"{names[class_id]!r} elsewhere"
                    )
        if sorted(names) != list(range(1, len(names) + 1)):
            raise SourceError(
                f"{self.root / 'annotations'}: class ids {sorted(names)} are not 1..{len(names)}"
            )
        self.class_names = tuple(names[i] for i in range(1, len(names) + 1))

    def _lines(self, split: str) -> Iterator[tuple[str, int, str]]:
        path = self.root / "annotations" / self.SPLITS[split]
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read the annotation file {path}: {exc}") from exc
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 4 or not fields[1].isdigit():
                raise SourceError(
                    f"line {n} of {path} is not `name class_id species breed_id`: {line!r}"
                )
            yield fields[0], int(fields[1]), f"line {n} of {path}"

    def records(self) -> dict[str, list[Record]]:
        splits = {}
        for split in self.SPLITS:
            records = []
            for image, class_id, _ in self._lines(split):
                ref = f"images/{image}.jpg"
                path = _require_file(self.root / ref, "image")
                records.append(
                    Record(safe_key(image), class_id - 1, split, ref, "jpg", path.stat().st_size)
                )
            splits[split] = records
        return splits

    def read(self, record: Record) -> bytes:
        return (self.root / record.ref).read_bytes()


SOURCES = ("imagefolder", "cifar10", "cifar100", "flowers102", "pets")


def open_source(
    kind: str, root: Path | str, *, val_labels: Path | str | None = None, name: str = ""
) -> Source:
    """The source of `kind` (one of `SOURCES`) reading the dataset at `root`."""
    if val_labels is not None and kind != "imagefolder":
        raise SourceError(f"a validation label file only applies to imagefolder, not {kind}")
    if kind == "imagefolder":
        return ImageFolderSource(root, val_labels=val_labels, name=name)
    if kind in CifarSource.LAYOUTS:
        return CifarSource(root, kind=kind, name=name)
    if kind == "flowers102":
        return Flowers102Source(root, name=name)
    if kind == "pets":
        return PetsSource(root, name=name)
    raise SourceError(f"unknown source {kind!r}; expected one of {', '.join(SOURCES)}")
