"""Check a sharded dataset against its card and manifest, reading every byte of every shard.

For every split in the card, every shard must exist with the card's size and read as a tar to
its end; it must hold exactly the manifest's keys for that shard, each as an image (`{key}.{ext}`
which PIL decodes), a label (`{key}.cls` matching the manifest) and the members the card names
(`extra.members`: a segmentation mask), whose bytes after the image's match the manifest's
sha256. The manifest must match the card's content hash and sample counts. Problems are
collected, not raised, so that one run reports all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from cbtlab.data.progress import Progress
from cbtlab.data.shards import CARD_NAME, MANIFEST_NAME, content_hash
from cbtlab.data.storage import Storage, open_storage

# WebDataset's rule: the key is the member name up to the first dot of its last path part.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
EXAMPLES = 3  # keys quoted in a problem that covers many samples
CHANGED = "differs from the manifest"


@dataclass(frozen=True)
class Problem:
    kind: str  # e.g. "missing shard", "truncated shard", "corrupt image", "missing samples"
    where: str  # a shard's name, or the card / manifest
    detail: str
    key: str | None = None

    def __str__(self) -> str:
        key = f" {self.key}" if self.key else ""
        return f"{self.where}: {self.kind}{key}: {self.detail}"


@dataclass
class VerifyReport:
    location: str
    shards: dict[str, int] = field(default_factory=dict)  # split -> shards checked
    samples: int = 0  # complete samples read (image and label)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 50) -> str:
        shards = sum(self.shards.values())
        per_split = ", ".join(f"{split} {n}" for split, n in self.shards.items())
        if self.ok:
            return (
                f"OK {self.location}: {self.samples:,} samples in {shards} shards ({per_split}) "
                "match the manifest and decode"
            )
        bad = len({p.where for p in self.problems})
        lines = [
            f"FAILED {self.location}: {_count(len(self.problems), 'problem')} in "
            f"{_count(bad, 'file')}; "
            f"{self.samples:,} samples read from {shards} shards ({per_split})"
        ]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _examples(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > EXAMPLES else ""
    return ", ".join(keys[:EXAMPLES]) + more


def _decode_error(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd EXIF; decoding is what counts
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {exc}"
    return None


def _members(storage: Storage, name: str) -> Iterator[tuple[str, bytes]]:
    with storage.open_read(name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member)
            yield member.name, data.read() if data is not None else b""


def _samples(
    storage: Storage, name: str, problems: list[Problem]
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """The shard's runs of members with one key, in order, each its key and its members'
    (extension, bytes), as a WebDataset reader groups them; a member whose name has no key is a
    problem. Where the tar breaks off, the run read so far comes out before the error."""
    key, parts = "", []
    try:
        for member, data in _members(storage, name):
            match = MEMBER_NAME.match(member)
            if match is None:
                problems.append(Problem("unexpected member", name, member))
                continue
            member_key, ext = match.groups()
            if parts and member_key != key:
                yield key, parts
                parts = []
            key = member_key
            parts.append((ext, data))
    except (tarfile.TarError, EOFError, OSError):
        if parts:
            yield key, parts
        raise
    if parts:
        yield key, parts


def _check_sample(
    name: str,
    key: str,
    parts: list[tuple[str, bytes]],
    row: tuple[int, str],
    image_ext: str,
    members: tuple[str, ...],
) -> list[Problem]:
    """The problems of one sample's members, in their order, against its manifest row (label,
    sha256): the sha256 covers the image's bytes and then the `members`' (every copy of a
    duplicated image or label is checked)."""
    label, sha256 = row
    found = dict(parts)
    rest = [found[m] for m in members if m in found]
    problems = []
    whole = len(rest) == len(members)  # (else the sample is reported incomplete)
    for ext, data in parts:
        if ext == image_ext:
            if whole and hashlib.sha256(b"".join([data, *rest])).hexdigest() != sha256:
                problems.append(Problem("checksum mismatch", name, CHANGED, key))
            error = _decode_error(data)
            if error is not None:
                problems.append(Problem("corrupt image", name, error, key))
        elif ext == "cls":
            if data.strip() != str(label).encode():
                detail = f"{data[:20]!r}, the manifest says {label}"
                problems.append(Problem("label mismatch", name, detail, key))
        elif ext not in members:
            problems.append(Problem("unexpected member", name, f"{key}.{ext}", key))
    return problems


def check_shard(
    storage: Storage,
    entry: dict[str, Any],
    rows: dict[str, tuple[int, str]],
    image_ext: str,
    members: tuple[str, ...] = (),
) -> tuple[list[Problem], int]:
    """The problems of one shard (a card entry) against its manifest's (label, sha256) by key,
    and how many complete samples (image, label and `members`) it holds."""
    name = entry["path"]
    size = storage.size(name)
    if size is None:
        return [Problem("missing shard", name, "not found")], 0
    problems = []
    if size != entry["num_bytes"]:
        kind = "truncated shard" if size < entry["num_bytes"] else "size mismatch"
        problems.append(
            Problem(kind, name, f"{size:,} bytes, the card says {entry['num_bytes']:,}")
        )
    seen: dict[str, set[str]] = {}
    try:
        for key, parts in _samples(storage, name, problems):
            if key in seen:  # a reader takes each run of one key for a sample of its own
                detail = f"the members of {key} are apart: a reader sees two samples"
                problems.append(Problem("split sample", name, detail, key))
            exts = seen.setdefault(key, set())
            for ext, _ in parts:
                if ext in exts:
                    problems.append(Problem("duplicate member", name, f"{key}.{ext}", key))
                exts.add(ext)
            if key in rows:  # (else reported once below as an extra key)
                problems += _check_sample(name, key, parts, rows[key], image_ext, members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        detail = f"the tar breaks off after {len(seen)} samples ({exc})"
        if problems and problems[0].kind == "truncated shard":
            detail = f"{problems[0].detail}; {detail}"
            problems.pop(0)
        problems.insert(0, Problem("truncated shard", name, detail))
    expected = {image_ext, "cls", *members}
    complete = [k for k, exts in seen.items() if expected <= exts]
    incomplete = [k for k, exts in seen.items() if k in rows and not expected <= exts]
    missing = [k for k in rows if k not in seen]
    extra = [k for k in seen if k not in rows]
    if incomplete:
        what = f"one of image, label, {', '.join(members)}" if members else "image or label"
        detail = f"{what} missing: {_examples(incomplete)}"
        problems.append(Problem("incomplete samples", name, detail))
    if missing:
        detail = (
            f"{len(missing)} samples of the manifest are not in the shard: {_examples(missing)}"
        )
        problems.append(Problem("missing keys", name, detail))
    if extra:
        detail = f"{len(extra)} samples are not in the manifest: {_examples(extra)}"
        problems.append(Problem("extra keys", name, detail))
    return problems, len(complete)


def verify_shards(
    location: str | Path, *, workers: int = 4, progress: bool = False
) -> VerifyReport:
    """Verify every shard of every split of the dataset at `location` (a folder or URL)."""
    storage = open_storage(location, create=False)
    report = VerifyReport(storage.location)
    raw = storage.read_bytes(CARD_NAME)
    if raw is None:
        report.problems.append(
            Problem(
                "missing card",
                CARD_NAME,
                "no card: the build is incomplete, or nothing was built at this location",
            )
        )
        return report
    card = json.loads(raw)
    if storage.size(MANIFEST_NAME) is None:
        report.problems.append(Problem("missing manifest", MANIFEST_NAME, "not found"))
        return report
    with storage.open_read(MANIFEST_NAME) as f:
        manifest = pq.read_table(f)
    if content_hash(manifest) != card["content_hash"]:
        report.problems.append(
            Problem("content hash", MANIFEST_NAME, "the manifest does not match the card's hash")
        )
    rows_by_shard: dict[str, dict[str, tuple[int, str]]] = {}
    columns = manifest.select(["key", "label", "shard", "sha256"]).to_pydict()
    for key, label, shard, sha256 in zip(*columns.values(), strict=True):
        rows_by_shard.setdefault(shard, {})[key] = (label, sha256)
    duplicates = [k for k, n in Counter(manifest.column("key").to_pylist()).items() if n > 1]
    if duplicates:
        detail = f"keys appear more than once: {_examples(duplicates)}"
        report.problems.append(Problem("duplicate keys", MANIFEST_NAME, detail))

    entries = [(split, e) for split, shards in card["splits"].items() for e in shards]
    carded = {e["path"] for _, e in entries}
    for shard in sorted(set(rows_by_shard) - carded):
        detail = f"{len(rows_by_shard[shard])} manifest rows name a shard the card lacks"
        report.problems.append(Problem("manifest", shard, detail))
    for _, entry in entries:
        listed = len(rows_by_shard.get(entry["path"], {}))
        if listed != entry["num_samples"]:
            detail = f"the card says {entry['num_samples']} samples, the manifest {listed}"
            report.problems.append(Problem("count mismatch", entry["path"], detail))

    meter = Progress(sum(e["num_samples"] for _, e in entries)) if progress else None

    def check(item: tuple[str, dict[str, Any]]) -> tuple[list[Problem], int]:
        _, entry = item
        rows = rows_by_shard.get(entry["path"], {})
        members = tuple(card.get("extra", {}).get("members", ()))
        return check_shard(storage, entry, rows, card["image_ext"], members)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (split, entry), (problems, samples) in zip(
            entries, pool.map(check, entries), strict=True
        ):
            report.shards[split] = report.shards.get(split, 0) + 1
            report.samples += samples
            report.problems += problems
            if meter is not None:
                meter.advance(entry["num_samples"])
    if meter is not None:
        meter.close()
    return report
