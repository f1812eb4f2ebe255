"""Writing and describing WebDataset shards: tar files, a Parquet manifest and a dataset card.

The manifest has one row per sample (key, label, split, shard, size, sha256 of the image bytes);
the card (JSON) lists every split's shards with their sample counts and byte sizes, and a content
hash over the manifest, so that a reader knows counts without opening tars and can check that
what is on disk is what was written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

CARD_NAME = "card.json"
MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str
    label: int


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    num_bytes: int


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

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [s.path for s in self.shards]


def write_split(
    samples: Iterable[Sample], out_dir: Path, split: str, samples_per_shard: int
) -> tuple[list[ShardInfo], list[dict[str, Any]]]:
    """Write samples into `{split}-{index:05d}.tar` shards; returns the shards and manifest rows."""
    shards: list[ShardInfo] = []
    rows: list[dict[str, Any]] = []
    writer: wds.TarWriter | None = None
    count = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            path = out_dir / f"{split}-{len(shards):05d}.tar"
            shards.append(ShardInfo(path.name, count, path.stat().st_size))
            writer = None

    for sample in samples:
        if writer is None:
            # A fixed member mtime makes a rebuild byte-identical to the first build.
            writer = wds.TarWriter(str(out_dir / f"{split}-{len(shards):05d}.tar"), mtime=0.0)
            count = 0
        writer.write({"__key__": sample.key, sample.ext: sample.image, "cls": sample.label})
        rows.append(
            {
                "key": sample.key,
                "label": sample.label,
                "split": split,
                "shard": f"{split}-{len(shards):05d}.tar",
                "size": len(sample.image),
                "sha256": hashlib.sha256(sample.image).hexdigest(),
            }
        )
        count += 1
        if count == samples_per_shard:
            close()
    close()
    return shards, rows


def write_card(
    out_dir: Path,
    name: str,
    splits: dict[str, list[ShardInfo]],
    rows: list[dict[str, Any]],
    *,
    num_classes: int,
    image_ext: str,
    extra: dict[str, Any],
) -> None:
    """Write the manifest and the card; the card is written last, so its presence marks a
    complete dataset."""
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out_dir / MANIFEST_NAME)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['key']}:{row['label']}:{row['sha256']}\n".encode())
    counts: dict[str, list[int]] = {}
    for row in rows:
        per_class = counts.setdefault(row["split"], [0] * num_classes)
        per_class[row["label"]] += 1
    card = {
        "name": name,
        "num_classes": num_classes,
        "image_ext": image_ext,
        "content_hash": digest.hexdigest(),
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
        shards.append(ShardInfo(str(path), entry["num_samples"], entry["num_bytes"]))
    return ShardSet(
        name=card["name"],
        split=split,
        shards=tuple(shards),
        num_classes=card["num_classes"],
        image_ext=card["image_ext"],
        content_hash=card["content_hash"],
        extra=card.get("extra", {}),
    )
