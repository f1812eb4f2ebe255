"""Writing and describing WebDataset shards: tar files, a Parquet manifest and a dataset card.

The manifest has one row per sample (key, label, split, shard, size, sha256 of the sample's bytes;
datasets built by `cbtlab.data.build` add the class name); the card (JSON) lists every split's
shards with their sample counts and byte sizes, the sample and per-class counts of every split,
the class names when known, and a content hash over the manifest, so that a reader knows counts
without opening tars and can check that what is on disk is what was written. The manifest holds
one Parquet row group per shard, so that a loader reads one shard's checksums alone
(checksums.py).

A shard holds, per sample, the members `{key}.{ext}` (the image bytes) and `{key}.cls` (the
label as decimal text), with fixed member metadata so that a rebuild is byte-identical; a
dataset whose samples carry more (a segmentation mask, `{key}.seg.png`) names those members in
its card (`extra.members`), and the manifest's size and sha256 then cover the image's bytes
followed by theirs, in that order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

CARD_NAME = "card.json"
MANIFEST_NAME = "manifest.parquet"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str
    label: int
    # Members stored beside the image and the label, as (extension, bytes): a mask.
    members: tuple[tuple[str, bytes], ...] = ()

    @property
    def payload(self) -> bytes:
        """The bytes the manifest's size and sha256 cover: the image's, then the members'."""
        return b"".join([self.image, *(data for _, data in self.members)])


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    num_bytes: int
    # Its path in the card, which the manifest's `shard` column holds ("": the path's file name).
    name: str = ""


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split of a dataset, as a reader needs them."""

    name: str
    split: str
    shards: tuple[ShardInfo, ...]
    num_classes: int
    image_ext: str
    content_hash: str
    extra: dict[str, Any]
    # The manifest's path or URL (None: the dataset has none), for the loader's checksums.
    manifest: str | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [s.path for s in self.shards]


def open_tar_writer(fileobj: IO[bytes]) -> wds.TarWriter:
    """A tar writer for shards; a fixed member mtime makes a rebuild byte-identical. It is an
    int: a float mtime makes tarfile add a 1 KiB PAX header to every member."""
    return wds.TarWriter(fileobj, mtime=0)


def write_sample(writer: wds.TarWriter, sample: Sample) -> None:
    """Write one sample as the members `{key}.{ext}` (the image), `{key}.cls` (the label) and
    its other members."""
    members = {"__key__": sample.key, sample.ext: sample.image, "cls": sample.label}
    writer.write(members | dict(sample.members))


def manifest_row(sample: Sample, split: str, shard: str) -> dict[str, Any]:
    """The manifest's row for one sample (callers may add columns, e.g. the class name)."""
    return {
        "key": sample.key,
        "label": sample.label,
        "split": split,
        "shard": shard,
        "size": len(payload := sample.payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


def write_split(
    samples: Iterable[Sample], out_dir: Path, split: str, samples_per_shard: int
) -> tuple[list[ShardInfo], list[dict[str, Any]]]:
    """Write samples into `{split}-{index:05d}.tar` shards; returns the shards and manifest rows."""
    shards: list[ShardInfo] = []
    rows: list[dict[str, Any]] = []
    writer: wds.TarWriter | None = None
    file: IO[bytes] | None = None
    count = 0

    def close() -> None:
        nonlocal writer, file
        if writer is not None and file is not None:
            writer.close()
            file.close()
            path = out_dir / shard_name(split, len(shards))
            shards.append(ShardInfo(path.name, count, path.stat().st_size))
            writer = file = None

    for sample in samples:
        if writer is None:
            file = open(out_dir / shard_name(split, len(shards)), "wb")  # noqa: SIM115
            writer = open_tar_writer(file)
            count = 0
        write_sample(writer, sample)
        rows.append(manifest_row(sample, split, shard_name(split, len(shards))))
        count += 1
        if count == samples_per_shard:
            close()
    close()
    return shards, rows


def content_hash(manifest: pa.Table) -> str:
    """The dataset's content hash: sha256 over the manifest's `key:label:sha256` lines."""
    columns = manifest.select(["key", "label", "sha256"]).to_pydict()
    digest = hashlib.sha256()
    for key, label, sha in zip(columns["key"], columns["label"], columns["sha256"], strict=True):
        digest.update(f"{key}:{label}:{sha}\n".encode())
    return digest.hexdigest()


def write_manifest(table: pa.Table, path: Path) -> None:
    """Write the manifest with one row group per run of rows of the same shard, so that a loader
    reads one shard's checksums without the rest (`checksums.read_shard_checksums`)."""
    if table.num_rows == 0:
        pq.write_table(table, path)
        return
    runs = [len(list(rows)) for _, rows in itertools.groupby(table.column("shard").to_pylist())]
    starts = [0, *itertools.accumulate(runs)]
    # Statistics on `shard` only: they select the row groups; those of the keys and checksums
    # would make the footer, which each loader process parses, 1.1 MB instead of 0.7 MB for
    # ImageNet's 1,281 training shards.
    with pq.ParquetWriter(path, table.schema, write_statistics=["shard"]) as writer:
        for start, end in itertools.pairwise(starts):
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)


def write_card(
    out_dir: Path,
    name: str,
    splits: dict[str, list[ShardInfo]],
    rows: list[dict[str, Any]] | pa.Table,
    *,
    num_classes: int,
    image_ext: str,
    extra: dict[str, Any],
    class_names: Sequence[str] | None = None,
) -> None:
    """Write the manifest and the card; the card is written last, so its presence marks a
    complete dataset.

    `rows` (dicts or a table, in shard order) become the manifest; the content hash runs over
    their (key, label, sha256). The card holds the class names when given, the sample count of
    every split, per-class counts and the shards."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    write_manifest(table, out_dir / MANIFEST_NAME)
    counts: dict[str, list[int]] = {}
    for split, label in zip(
        table.column("split").to_pylist(), table.column("label").to_pylist(), strict=True
    ):
        counts.setdefault(split, [0] * num_classes)[label] += 1
    card: dict[str, Any] = {
        "name": name,
        "num_classes": num_classes,
        "image_ext": image_ext,
        "content_hash": content_hash(table),
    }
    if class_names is not None:
        card["class_names"] = list(class_names)
    card |= {
        "num_samples": {split: sum(per_class) for split, per_class in counts.items()},
        "class_counts": counts,
        "splits": {
            split: [
                {"path": s.path, "num_samples": s.num_samples, "num_bytes": s.num_bytes}
                for s in shards
            ]
            for split, shards in splits.items()
        },
        "extra": extra,
    }
    tmp = out_dir / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, out_dir / CARD_NAME)


def read_split(root: Path, split: str) -> ShardSet:
    """The shards of `split` under `root`, from its card, with absolute paths.

    Raises FileNotFoundError for a missing card, a missing shard or a shard whose size differs
    from the card's (truncated or replaced)."""
    card_path = root / CARD_NAME
    if not card_path.is_file():
        raise FileNotFoundError(f"no dataset card at {card_path}")
    card = json.loads(card_path.read_text())
    if split not in card["splits"]:
        raise KeyError(f"split {split!r} not in {card_path}; has {sorted(card['splits'])}")
    shards = []
    for entry in card["splits"][split]:
        path = root / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {card_path} is missing")
        size = path.stat().st_size
        if size != entry["num_bytes"]:
            raise FileNotFoundError(
                f"shard {path} has {size} bytes, the card says {entry['num_bytes']}"
            )
        shards.append(ShardInfo(str(path), entry["num_samples"], entry["num_bytes"], entry["path"]))
    manifest = root / MANIFEST_NAME
    return ShardSet(
        name=card["name"],
        split=split,
        shards=tuple(shards),
        num_classes=card["num_classes"],
        image_ext=card["image_ext"],
        content_hash=card["content_hash"],
        extra=card.get("extra", {}),
        manifest=str(manifest) if manifest.is_file() else None,
    )
