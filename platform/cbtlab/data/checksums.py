"""Checking samples against the manifest's sha256 as the loader reads them.

The manifest (`shards.py`) holds the sha256 of every sample's image bytes, the `{key}.{ext}`
member of its shard (for a dataset whose samples carry more, a segmentation mask, of the image's
bytes followed by theirs: `verify_shards` checks those; the segmentation loader does not). A
shard whose bytes changed after it was built (a bad disk, a botched copy, an overwrite) may
still read as a tar and even decode, so only the checksum tells a
corrupt sample from a good one. The policy (`data.checksums`) says what a mismatch does:

- "skip" (the default): the sample is counted and skipped, like one that does not decode
  (`data/corrupt_samples`, `val/corrupt_samples`), and logged with its key and shard;
- "stop": the read raises `ChecksumError` naming the shard and the key;
- "off": nothing is checked; a corrupt but decodable sample is trained on, unseen.

A key the manifest does not list for its shard counts as a mismatch. A dataset without a
manifest (built by other tools) is read unchecked, logged once, under "skip"; "stop" refuses it,
as it promises a run on verified bytes only.

Memory. No stream holds the whole manifest (ImageNet's has 1.3M rows): when a stream opens a
shard it reads only that shard's (key, sha256) rows. Manifests written by `shards.write_card`
hold one Parquet row group per shard, so the read picks the shard's row group by its
statistics (min = max = the shard's name) and fetches nothing else; an older manifest, one
row group for all, is read whole and filtered, which is correct but slower. A remote manifest is
read through fsspec (ranged reads); a pipe, or a scheme fsspec lacks, is downloaded whole for
each shard.

Cost. Hashing runs at memory speed (OpenSSL's sha256, hardware-accelerated where the CPU has
SHA extensions): `checksum_cost` measures it per image, for `cbtlab data bench`; on 47 kB JPEGs
it is tens of microseconds, against milliseconds to decode one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from cbtlab.data.remote import is_url, open_url
from cbtlab.data.shards import ShardInfo, ShardSet
from cbtlab.data.storage import url_filesystem

log = logging.getLogger(__name__)

POLICIES = ("skip", "stop", "off")
# Rows of an old manifest (no row group per shard) that are filtered in Python, unlogged: the
# digits' 1,797 take no time; ImageNet's 1.3M would take a second per shard.
SMALL_MANIFEST = 100_000


class ChecksumError(ValueError):
    """A sample's bytes differ from the manifest's checksum (policy "stop"), or "stop" was asked
    of a dataset without a manifest. A ValueError, not an OSError: reading again gives the same
    bytes, so it is no failure to retry."""


def read_shard_checksums(manifest: str, shard: str) -> dict[str, str]:
    """The manifest's {key: sha256 hex} rows of one shard (its name in the card), reading only
    the row groups whose `shard` statistics can hold it."""
    metadata, ranges = _footer(manifest, _version(manifest))
    groups = _row_groups(ranges, shard)
    if not groups:
        return {}
    mixed = any(ranges[i] != (shard, shard) for i in groups)  # rows of other shards too
    with _open_manifest(manifest) as file:
        parquet = pq.ParquetFile(file, metadata=metadata)
        table = parquet.read_row_groups(groups, columns=["key", "sha256"] + ["shard"] * mixed)
    if mixed and table.num_rows > SMALL_MANIFEST:
        _warn_whole(manifest)
        # pyarrow.compute: a second at its first call in a process, then fast.
        table = table.filter(pc.equal(table.column("shard"), shard))
    columns = [table.column(name).to_pylist() for name in ("key", "sha256", "shard")[: 2 + mixed]]
    if mixed:  # a small one, filtered here
        return {key: sha for key, sha, name in zip(*columns, strict=True) if name == shard}
    return dict(zip(*columns, strict=True))


# A row group's (min, max) of the `shard` column; None where it has no statistics.
Range = tuple[str, str] | None


@functools.lru_cache(maxsize=4)
def _footer(manifest: str, version: tuple[int, int] | None) -> tuple[pq.FileMetaData, list[Range]]:
    """The manifest's Parquet footer and its row groups' shard ranges, read once per process
    (ImageNet's footer: 0.7 MB, 20 ms to parse and 40 ms to walk, where a shard's row group
    then takes 3 ms to read). `version` tells a rewritten local file."""
    with _open_manifest(manifest) as file:
        metadata = pq.ParquetFile(file).metadata
    return metadata, shard_ranges(metadata)


def _version(manifest: str) -> tuple[int, int] | None:
    """A local manifest's (mtime, size); None for a remote one, whose footer is kept as first
    read."""
    if is_url(manifest) and not manifest.startswith("file://"):
        return None
    stat = Path(manifest.removeprefix("file://")).stat()
    return stat.st_mtime_ns, stat.st_size


def shard_ranges(metadata: pq.FileMetaData) -> list[Range]:
    """Each row group's range of shard names, from its statistics."""
    column = metadata.schema.names.index("shard")
    ranges: list[Range] = []
    for i in range(metadata.num_row_groups):
        stats = metadata.row_group(i).column(column).statistics
        has = stats is not None and stats.has_min_max
        ranges.append((stats.min, stats.max) if has else None)
    return ranges


def _row_groups(ranges: list[Range], shard: str) -> list[int]:
    """The row groups that may hold `shard`'s rows (all those without statistics)."""
    return [i for i, r in enumerate(ranges) if r is None or r[0] <= shard <= r[1]]


def _open_manifest(manifest: str) -> Any:
    """A seekable binary file of the manifest: local, through fsspec, or else downloaded."""
    if not is_url(manifest) or manifest.startswith("file://"):
        return open(manifest.removeprefix("file://"), "rb")
    if not manifest.startswith("pipe:"):
        try:
            fs, path = url_filesystem(manifest)
            return fs.open(path, "rb")
        except (ImportError, ValueError):
            pass  # no fsspec filesystem for the scheme: webdataset's opener below
    with open_url(manifest) as stream:
        return io.BytesIO(stream.read())


@dataclass(frozen=True)
class ShardChecksums:
    """What a stream checks its samples against: the manifest (path or URL) and the policy,
    "skip" or "stop". Small and picklable: it travels to the loader workers, which read each
    shard's rows themselves when they open it."""

    manifest: str
    policy: str

    def expected(self, shard: ShardInfo) -> Mapping[str, str] | None:
        """{key: sha256} of `shard`'s samples; None (logged) where the manifest lists none of
        them (under "stop": raises), as then the manifest does not describe this shard."""
        name = shard.name or PurePosixPath(shard.path).name
        try:
            rows = read_shard_checksums(self.manifest, name)
        except FileNotFoundError:  # a remote dataset's card does not say whether it has one
            if self.policy == "stop":
                raise ChecksumError(
                    f"no manifest at {self.manifest} to check shard {shard.path} against "
                    "(data.checksums='stop')"
                ) from None
            _warn_unchecked(self.manifest)
            return None
        if rows:
            return rows
        message = f"the manifest {self.manifest} lists no sample of shard {shard.path}"
        if self.policy == "stop":
            raise ChecksumError(f"{message} (data.checksums='stop')")
        log.warning("%s; its samples are not checked", message)
        return None

    def mismatch(self, key: str, image: bytes, expected: Mapping[str, str]) -> str | None:
        """Why `image` is not the manifest's bytes for `key`, or None when it is."""
        want = expected.get(key)
        if want is None:
            return "its key is not in the manifest"
        got = hashlib.sha256(image).hexdigest()
        return (
            None if got == want else f"sha256 {got[:12]}... where the manifest has {want[:12]}..."
        )


def shard_checksums(shardset: ShardSet, policy: str) -> ShardChecksums | None:
    """The checks a loader of `shardset` runs under `policy`; None for "off", or (logged once
    per dataset) for a dataset without a manifest under "skip"."""
    if policy not in POLICIES:
        raise ValueError(f"checksums policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "off":
        return None
    if shardset.manifest is None:
        if policy == "stop":
            raise ChecksumError(
                f"dataset {shardset.name!r} has no manifest to check its samples against; "
                "data.checksums='stop' needs one (use 'skip' to read it unchecked)"
            )
        _warn_unchecked(shardset.name)
        return None
    return ShardChecksums(shardset.manifest, policy)


@functools.cache  # once per manifest and process
def _warn_whole(manifest: str) -> None:
    log.warning(
        "the manifest %s holds no row group per shard: each shard's checksums take reading "
        "it whole; rewrite it with cbtlab.data.shards.write_manifest",
        manifest,
    )


@functools.cache  # once per dataset and process
def _warn_unchecked(dataset: str) -> None:
    log.warning("no manifest for %s: its samples' checksums are not checked", dataset)


def checksum_cost(images: Sequence[bytes], *, repeat: int = 3) -> float:
    """Milliseconds per image that checking `images` (encoded bytes) costs a loader: hashing
    each with sha256 and comparing it with its manifest row, found by key in a shard's rows.
    The best of `repeat` passes."""
    if not images:
        raise ValueError("no images to time")
    keys = [f"{i:08d}" for i in range(len(images))]
    expected = {
        key: hashlib.sha256(image).hexdigest() for key, image in zip(keys, images, strict=True)
    }
    check = ShardChecksums("", "skip")
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for key, image in zip(keys, images, strict=True):
            if check.mismatch(key, image, expected) is not None:
                raise AssertionError("a checksum that was just computed differs")
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(images)
