"""Build WebDataset shards, a Parquet manifest and a dataset card from a `Source`.

The build runs in four steps:
1. Plan. The source's records are cut into shards up front and deterministically: the training
   split in a seeded random order (so shards mix classes), the other splits in source order;
   a shard closes at `samples_per_shard` samples and/or before it would pass `max_shard_bytes`
   (sized from the source's byte sizes plus tar headers; with re-encoding that is an estimate).
   Shards keep the `{split}-{index:05d}.tar` naming and the members of `shards.write_sample`.
2. Resume. A shard counts as done when its record `_build/<shard>.json` exists, was written for
   the same plan (the digest of its keys, labels, sources, encoding, statistics share and what
   else the source says shapes its bytes, `Source.build_spec`) and
   the shard has the recorded size. Records are written only after their shard is in place, so
   a shard cut short by a crash, a missing shard or one left from a different plan is rebuilt.
3. Write. Each remaining shard is one unit of work: in this process (`local=True`), in a pool
   of processes of this machine (`local=True, workers=N`), or as a Ray task with fractional CPUs
   on an existing cluster (`address`, or $RAY_ADDRESS) or a local Ray.
   A shard is written to `<shard>.tmp-<random>` and renamed into place (`cbtlab.data.storage`),
   so a reader never sees a partial shard under its final name. Member mtimes are fixed, so a
   rebuild is byte-identical.
4. Describe. The manifest (key, label, class_name, split, shard, size, sha256) and then the card
   (`shards.write_card`) are written last; the card is removed when a build starts, so its
   presence marks a complete dataset. The card's `extra` holds the source, the build settings
   and the per-channel mean/std of the stored training images (over `stats_samples` of them,
   spread evenly over the training shards), which the training loop normalises with.

Images are stored as the source gives them (original JPEG bytes, PNG for CIFAR) unless an
`Encoding` asks to downscale (shorter side to `resize`) or re-encode as JPEG (`jpeg_quality`).
Every image is decoded whole as its shard is written (`decode_error`): a shard holding images
that do not decode is not committed, every shard is still checked, and the build stops with
`UndecodableImages`, which lists them all; with `skip_bad` they are left out instead, and the
card lists them (`extra.skipped_images`).

A source whose samples carry more than an image and a label (`Source.members`: ADE20K's masks,
`cbtlab.data.segmentation`) gives their bytes as each shard is written (`Source.annotate`, which
may also give the label: a mask's most frequent class); its images are never resized, and a card
records the source's own normalisation (`Source.statistics`) where it has one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from cbtlab.cluster import connect_ray
from cbtlab.data.progress import Progress
from cbtlab.data.shards import (
    CARD_NAME,
    MANIFEST_NAME,
    Sample,
    ShardInfo,
    manifest_row,
    open_tar_writer,
    shard_name,
    write_card,
    write_sample,
)
from cbtlab.data.sources import Record, Source, SourceError
from cbtlab.data.storage import LocalStorage, Storage, open_storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORDS_DIR = "_build"
# JPEG quality when a JPEG must be re-encoded (downscaled) and no quality was asked for.
DEFAULT_JPEG_QUALITY = 95
TAR_BLOCK = 512  # tar headers and member data come in blocks of this size
TAR_RECORD = 20 * TAR_BLOCK  # Python's tarfile pads an archive to whole records
TAR_NAME_ROOM = 90  # keys longer than this (plus ".ext") may not fit a plain tar header
TRAIN_SPLIT = "train"


class BuildError(RuntimeError):
    """A shard could not be written; shards finished before it are kept for a resume."""


class UndecodableImages(BuildError):
    """Images of the source do not decode; `images` holds (file, reason) for every one."""

    def __init__(self, root: str, images: list[tuple[str, str]]) -> None:
        listing = "\n".join(f"  {ref}: {reason}" for ref, reason in images)
        super().__init__(
            f"{len(images)} images in {root} do not decode:\n{listing}\nremove or replace them, "
            "or leave them out with --skip-bad (the card lists them as extra.skipped_images)"
        )
        self.root, self.images = root, images

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.root, self.images))


# What PIL raises on bytes it cannot decode as an image: UnidentifiedImageError and "image
# file is truncated" are OSErrors; some broken PNG chunks raise SyntaxError.
UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_error(image: bytes) -> str | None:
    """Why `image` does not decode (every pixel is decoded), or None when it does."""
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
    except UNDECODABLE as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class Encoding:
    """Optional re-encoding. `resize`: downscale so the shorter side is this many pixels (an
    image already that small is kept as it is: upscaling adds bytes, not information).
    `jpeg_quality`: re-encode every image as JPEG at this quality. Neither: original bytes."""

    resize: int | None = None
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"resize must be a positive size in pixels, got {self.resize}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def active(self) -> bool:
        return self.resize is not None or self.jpeg_quality is not None

    def output_ext(self, ext: str) -> str:
        return "jpg" if self.jpeg_quality is not None else ext

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) after downscaling the shorter side to `resize`."""
        w, h = size
        if self.resize is None or min(w, h) <= self.resize:
            return size
        scale = self.resize / min(w, h)
        if w <= h:
            return self.resize, max(1, round(h * scale))
        return max(1, round(w * scale)), self.resize

    def apply(self, image: bytes, ext: str, *, where: str = "") -> bytes:
        if not self.active:
            return image
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                img = opened
                size = self.target_size(img.size)
                if size == img.size and self.jpeg_quality is None:
                    return image  # nothing to do: keep the original bytes
                out_ext = self.output_ext(ext)
                keep = ("L", "RGB") if out_ext == "jpg" else ("L", "RGB", "RGBA")
                if img.mode not in keep:
                    img = img.convert("RGB")
                if size != img.size:
                    img = img.resize(size, Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                fmt = Image.registered_extensions()[f".{out_ext}"]
                options = {"quality": self.jpeg_quality or DEFAULT_JPEG_QUALITY}
                img.save(buf, format=fmt, **(options if fmt == "JPEG" else {}))
                return buf.getvalue()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SourceError(f"cannot re-encode the image {where}: {exc}") from exc


@dataclass(frozen=True)
class ShardPlan:
    """Which records go, in which order, into one shard."""

    split: str
    index: int
    records: tuple[Record, ...]
    # How many of its first images feed the training-set mean/std (0 outside training).
    stats_count: int = 0

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def num_samples(self) -> int:
        return len(self.records)

    def digest(self, encoding: Encoding, image_ext: str, source: Source) -> str:
        """Changes whenever the shard's bytes or its record could change."""
        spec = {
            "format": FORMAT_VERSION,
            "name": self.name,
            "encoding": asdict(encoding),
            "ext": image_ext,
            "stats_count": self.stats_count,
            "records": [[r.key, r.label, r.ref, r.size] for r in self.records],
        }
        if source.build_spec():  # (a classification build's digest is what it always was)
            spec["source"] = source.build_spec()
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _tar_bytes(record: Record) -> int:
    """A sample's bytes in a tar: header + padded image, header + one block for the label, a
    header and up to a block of padding for each other member (whose size `record.size`
    includes; a mask is re-encoded, so there it is an estimate), plus a PAX header pair for each
    member when its name is too long for the plain header."""
    count = 2 + record.members
    long_names = 2 * count * TAR_BLOCK if len(record.key) > TAR_NAME_ROOM else 0
    padded = math.ceil(record.size / TAR_BLOCK) * TAR_BLOCK
    return 3 * TAR_BLOCK + 2 * record.members * TAR_BLOCK + padded + long_names


def _padded(size: int) -> int:
    return math.ceil(size / TAR_RECORD) * TAR_RECORD


def plan_shards(
    records: dict[str, list[Record]],
    *,
    samples_per_shard: int | None = 1000,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    stats_samples: int = 10_000,
) -> list[ShardPlan]:
    """Cut every split into shards; the training split is shuffled with `seed` first."""
    if samples_per_shard is None and max_shard_bytes is None:
        raise ValueError("give samples_per_shard, max_shard_bytes or both")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < TAR_RECORD:
        raise ValueError(f"max_shard_bytes must be at least {TAR_RECORD}, got {max_shard_bytes}")
    if stats_samples < 0:
        raise ValueError(f"stats_samples must be >= 0, got {stats_samples}")
    if not records.get(TRAIN_SPLIT):
        raise SourceError("the source has no training samples")
    seen: dict[str, str] = {}
    for split_records in records.values():
        for r in split_records:
            if r.key in seen:
                raise SourceError(f"two samples have the key {r.key!r} ({seen[r.key]}, {r.ref})")
            seen[r.key] = r.ref

    plans: list[ShardPlan] = []
    for split, split_records in records.items():
        order = list(split_records)
        if split == TRAIN_SPLIT:
            order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
        groups: list[list[Record]] = [[]]
        size = 2 * TAR_BLOCK  # the end-of-archive blocks
        for r in order:
            full = samples_per_shard is not None and len(groups[-1]) == samples_per_shard
            too_big = (
                max_shard_bytes is not None and _padded(size + _tar_bytes(r)) > max_shard_bytes
            )
            if groups[-1] and (full or too_big):
                groups.append([])
                size = 2 * TAR_BLOCK
            groups[-1].append(r)
            size += _tar_bytes(r)
        per_shard = math.ceil(stats_samples / len(groups)) if split == TRAIN_SPLIT else 0
        plans += [
            ShardPlan(split, i, tuple(g), min(per_shard, len(g))) for i, g in enumerate(groups)
        ]
    return plans


@dataclass
class ShardResult:
    """What writing one shard produced; saved as its build record for resuming."""

    name: str
    split: str
    digest: str
    num_samples: int
    num_bytes: int
    rows: list[dict[str, Any]]
    # Sums over the statistics images' pixels, scaled to [0, 1]: per channel (R, G, B) the sum
    # and the sum of squares, then the pixel count.
    pixel_sums: list[float] = field(default_factory=lambda: [0.0] * 7)
    stats_images: int = 0
    # [file, reason] of each image that did not decode: left out (skip_bad), or, when not
    # skipped, the shard was not written.
    undecodable: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: bytes | str) -> ShardResult:
        return cls(**json.loads(text))


def record_name(shard: str) -> str:
    return f"{RECORDS_DIR}/{shard}.json"


def _pixel_sums(image: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(image)) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot decode the image {where}: {exc}") from exc
    return np.concatenate([pixels.sum(0), (pixels**2).sum(0), [len(pixels)]])


def _write_records(
    source: Source,
    plan: ShardPlan,
    writer: Any,
    *,
    encoding: Encoding,
    image_ext: str,
    skip_bad: bool,
    on_sample: Callable[[], None] | None,
) -> tuple[list[dict[str, Any]], np.ndarray, int, list[list[str]]]:
    """Decode and write the plan's records: its manifest rows, pixel sums, statistics images
    and undecodable images. Once an image fails and `skip_bad` is off, the rest are only
    decoded (the shard will not be committed), so that every failing image is found."""
    rows: list[dict[str, Any]] = []
    sums, stats_images, bad = np.zeros(7), 0, []
    for i, record in enumerate(plan.records):
        where = f"{record.ref} in {source.root}"
        raw = source.read(record)
        reason = decode_error(raw)
        if reason is not None:
            bad.append([record.ref, reason])
        if reason is None and (skip_bad or not bad):
            image = encoding.apply(raw, record.ext, where=where)
            label, members = source.annotate(record)
            sample = Sample(record.key, image, image_ext, label, members)
            write_sample(writer, sample)
            row = manifest_row(sample, plan.split, plan.name)
            class_name = source.class_names[label]
            rows.append({"key": row["key"], "label": row["label"], "class_name": class_name} | row)
            if i < plan.stats_count:
                sums += _pixel_sums(image, where)
                stats_images += 1
        if on_sample is not None:
            on_sample()
    return rows, sums, stats_images, bad


def write_shard(
    source: Source,
    plan: ShardPlan,
    location: str,
    *,
    encoding: Encoding,
    image_ext: str,
    skip_bad: bool = False,
    on_sample: Callable[[], None] | None = None,
) -> ShardResult:
    """Write one planned shard atomically to `location`, then its build record. Images that
    do not decode are left out with `skip_bad`; without it, the shard is neither committed nor
    recorded, and its result lists them (`undecodable`)."""
    storage = open_storage(location)
    storage.clean_temp(plan.name)
    temp = storage.temp_path(plan.name)
    try:
        with open(temp, "wb") as f:
            writer = open_tar_writer(f)
            try:
                rows, sums, stats_images, bad = _write_records(
                    source,
                    plan,
                    writer,
                    encoding=encoding,
                    image_ext=image_ext,
                    skip_bad=skip_bad,
                    on_sample=on_sample,
                )
            finally:  # also on errors: a tar stream left open fails when collected
                writer.close()
        num_bytes = temp.stat().st_size
        if bad and not skip_bad:
            return ShardResult(plan.name, plan.split, "", 0, 0, [], undecodable=bad)
        storage.commit(temp, plan.name)
    finally:
        temp.unlink(missing_ok=True)
    result = ShardResult(
        name=plan.name,
        split=plan.split,
        digest=plan.digest(encoding, image_ext, source),
        num_samples=len(rows),
        num_bytes=num_bytes,
        rows=rows,
        pixel_sums=sums.tolist(),
        stats_images=stats_images,
        undecodable=bad,
    )
    storage.write_bytes(record_name(plan.name), result.to_json().encode())
    return result


def _finished(storage: Storage, plan: ShardPlan, digest: str) -> ShardResult | None:
    """The shard's build record when the shard is complete and from this plan, else None."""
    raw = storage.read_bytes(record_name(plan.name))
    if raw is None:
        return None
    try:
        result = ShardResult.from_json(raw)
    except (ValueError, TypeError):
        return None
    if result.digest != digest or storage.size(plan.name) != result.num_bytes:
        return None
    return result


@dataclass(frozen=True)
class BuildResult:
    location: str
    written: list[str]
    skipped: list[str]
    num_samples: dict[str, int]
    card: dict[str, Any]


def _image_ext(records: dict[str, list[Record]], encoding: Encoding) -> str:
    exts = {r.ext for split in records.values() for r in split}
    if encoding.jpeg_quality is not None:
        return "jpg"
    if len(exts) > 1:
        raise SourceError(
            f"the images are of several types ({', '.join(sorted(exts))}) but a dataset's "
            "shards hold one: re-encode them all as JPEG (--jpeg-quality)"
        )
    return exts.pop()


def _resume(
    storage: Storage,
    source: Source,
    plans: list[ShardPlan],
    encoding: Encoding,
    image_ext: str,
    keep: Callable[[ShardResult], None],
    skip_bad: bool = False,
) -> list[ShardPlan]:
    """The shards still to write, in plan order; the result of each complete one goes to `keep`
    as it is read (so only one shard's manifest rows are held as Python objects at a time).
    A shard that left out undecodable images is complete only for a build that skips them."""
    todo: list[ShardPlan] = []
    for plan in plans:
        result = _finished(storage, plan, plan.digest(encoding, image_ext, source))
        if result is None or (result.undecodable and not skip_bad):
            todo.append(plan)
        else:
            keep(result)
    return todo


def _progress(plans: list[ShardPlan], finished: Iterable[ShardResult]) -> Progress:
    """A progress line over every planned sample, those of the finished shards counted done."""
    return Progress(sum(p.num_samples for p in plans), done=sum(r.num_samples for r in finished))


def build_shards(
    source: Source,
    output: str | Path,
    *,
    samples_per_shard: int | None = 1000,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    encoding: Encoding | None = None,
    stats_samples: int = 10_000,
    local: bool = False,
    address: str | None = None,
    cpus_per_task: float = 0.5,
    progress: bool = True,
    skip_bad: bool = False,
    workers: int = 1,
) -> BuildResult:
    """Build (or finish building) the shards, manifest and card of `source` at `output`:
    on Ray, or with `local` in this process, or in `workers` processes of this machine.

    Raises `UndecodableImages` listing every image that does not decode, after writing the
    shards without any; `skip_bad` leaves those images out and lists them in the card."""
    encoding = encoding or Encoding()
    _check_settings(source, encoding, workers)
    records = source.records()
    image_ext = _image_ext(records, encoding)
    plans = plan_shards(
        records,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        seed=seed,
        # (a source with a normalisation of its own has the card record it)
        stats_samples=stats_samples if source.statistics is None else 0,
    )
    storage = open_storage(output)
    storage.remove(CARD_NAME)  # the dataset is incomplete until the card is written again

    # Each shard's manifest rows as an Arrow table: columns stay compact at ImageNet scale.
    done: dict[str, ShardResult] = {}
    tables: dict[str, pa.Table] = {}

    def keep(result: ShardResult) -> None:
        tables[result.name] = pa.Table.from_pylist(result.rows)
        result.rows = []
        done[result.name] = result

    todo = _resume(storage, source, plans, encoding, image_ext, keep, skip_bad)
    skipped = [p.name for p in plans if p.name in done]
    if skipped:
        log.info("resuming: %d of %d shards are complete", len(skipped), len(plans))
    meter = _progress(plans, (done[n] for n in skipped)) if progress else None
    run = (_run_processes if workers > 1 else _run_local) if local else _run_ray
    results = run(
        source,
        todo,
        storage.location,
        encoding=encoding,
        image_ext=image_ext,
        skip_bad=skip_bad,
        meter=meter,
        address=address,
        cpus_per_task=cpus_per_task,
        workers=workers,
    )
    _keep_decodable(source, results, keep, skip_bad, meter)

    ordered = [done[p.name] for p in plans]
    card = _describe(
        source,
        storage,
        ordered,
        pa.concat_tables(tables[p.name] for p in plans),
        image_ext,
        encoding,
        seed=seed,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        **({"skipped_images": _skipped(ordered)} if skip_bad else {}),
    )
    _warn_stale(storage, plans)
    return BuildResult(storage.location, [p.name for p in todo], skipped, _counts(ordered), card)


def _counts(results: list[ShardResult]) -> dict[str, int]:
    """Each split's sample count."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.split] = counts.get(r.split, 0) + r.num_samples
    return counts


def _check_settings(source: Source, encoding: Encoding, workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if source.members and encoding.resize is not None:
        raise ValueError(
            f"{source.kind} samples carry {', '.join(source.members)} aligned with their "
            "images' pixels: a build cannot resize the images alone (leave --resize out)"
        )


def _keep_decodable(
    source: Source,
    results: Iterable[ShardResult],
    keep: Callable[[ShardResult], None],
    skip_bad: bool,
    meter: Progress | None,
) -> None:
    """`keep` each written shard; then raise UndecodableImages listing every image that did
    not decode in the shards that were not written for it (all of them, not just the first).
    The progress line ends either way."""
    undecodable: list[tuple[str, str]] = []
    try:
        for result in results:
            if result.undecodable and not skip_bad:
                undecodable += [(ref, reason) for ref, reason in result.undecodable]
            else:
                keep(result)
    finally:
        if meter is not None:
            meter.close()
    if undecodable:
        raise UndecodableImages(str(source.root), sorted(undecodable))


def _skipped(results: list[ShardResult]) -> list[dict[str, str]]:
    """The card's `extra.skipped_images`: each image left out, with why it did not decode."""
    return [
        {"file": ref, "error": reason}
        for ref, reason in sorted(item for r in results for item in r.undecodable)
    ]


def _run_local(
    source: Source,
    todo: list[ShardPlan],
    location: str,
    *,
    encoding: Encoding,
    image_ext: str,
    skip_bad: bool,
    meter: Progress | None,
    **_: Any,
) -> Iterator[ShardResult]:
    on_sample = (lambda: meter.advance(1)) if meter is not None else None
    for plan in todo:
        yield _shard_result(
            plan,
            lambda plan=plan: write_shard(
                source, plan, location, encoding=encoding, image_ext=image_ext,
                skip_bad=skip_bad, on_sample=on_sample,
            ),
        )  # fmt: skip


def _shard_result(plan: ShardPlan, write: Callable[[], ShardResult]) -> ShardResult:
    """What `write()` gives for `plan`; a `SourceError` (the input's fault, naming its file)
    raised as it is, any other error as a `BuildError` naming the shard."""
    try:
        return write()
    except SourceError:
        raise
    except Exception as exc:
        raise BuildError(f"writing shard {plan.name} failed: {exc}") from exc


def _run_processes(
    source: Source,
    todo: list[ShardPlan],
    location: str,
    *,
    encoding: Encoding,
    image_ext: str,
    skip_bad: bool,
    meter: Progress | None,
    workers: int,
    **_: Any,
) -> Iterator[ShardResult]:
    """Each shard a task of a pool of `workers` processes, results in the order they finish;
    the first failure cancels the shards not yet started (those being written finish)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not todo:
        return
    with ProcessPoolExecutor(min(workers, len(todo))) as pool:
        futures = {
            pool.submit(
                write_shard, source, plan, location, encoding=encoding, image_ext=image_ext,
                skip_bad=skip_bad,
            ): plan
            for plan in todo
        }  # fmt: skip
        try:
            for future in as_completed(futures):
                plan = futures[future]
                result = _shard_result(plan, future.result)
                if meter is not None:
                    meter.advance(plan.num_samples)
                yield result
        finally:
            for future in futures:
                future.cancel()


def _run_ray(
    source: Source,
    todo: list[ShardPlan],
    location: str,
    *,
    encoding: Encoding,
    image_ext: str,
    skip_bad: bool,
    meter: Progress | None,
    address: str | None,
    cpus_per_task: float,
    **_: Any,
) -> Iterator[ShardResult]:
    """Each shard a Ray task; at most a couple of tasks per CPU are queued at a time."""
    if not todo:
        return
    import ray

    started = not ray.is_initialized()
    connect_ray(address)
    if meter is not None:
        meter.restart_clock()
    try:
        task = ray.remote(num_cpus=cpus_per_task)(write_shard)
        source_ref = ray.put(source)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        window = max(2, int(2 * cpus / cpus_per_task))
        queue = iter(todo)
        pending: dict[Any, ShardPlan] = {}

        def submit() -> None:
            plan = next(queue, None)
            if plan is not None:
                ref = task.remote(
                    source_ref,
                    plan,
                    location,
                    encoding=encoding,
                    image_ext=image_ext,
                    skip_bad=skip_bad,
                )
                pending[ref] = plan

        for _ in range(window):
            submit()
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ready)
            try:
                result = ray.get(ready)
            except Exception as exc:
                for ref in pending:
                    ray.cancel(ref)
                raise BuildError(f"writing shard {plan.name} failed: {exc}") from exc
            if meter is not None:
                meter.advance(plan.num_samples)
            submit()
            yield result
    finally:
        if started:
            ray.shutdown()


def _describe(
    source: Source,
    storage: Storage,
    results: list[ShardResult],
    table: pa.Table,
    image_ext: str,
    encoding: Encoding,
    **settings: Any,
) -> dict[str, Any]:
    """Write the manifest (`table`) and then the card from the shards' results, in plan
    order."""
    splits: dict[str, list[ShardInfo]] = {}
    for r in results:
        splits.setdefault(r.split, []).append(ShardInfo(r.name, r.num_samples, r.num_bytes))
    sums = np.sum([r.pixel_sums for r in results if r.split == TRAIN_SPLIT], axis=0)
    extra: dict[str, Any] = {**source.describe(), "format_version": FORMAT_VERSION, **settings}
    extra |= {"resize": encoding.resize, "jpeg_quality": encoding.jpeg_quality, "channels": 3}
    if source.members:
        extra["members"] = list(source.members)
    if source.statistics is not None:
        extra |= {"mean": list(source.statistics[0]), "std": list(source.statistics[1])}
    if encoding.resize is not None and "image_size" in extra:
        extra["image_size"] = min(extra["image_size"], encoding.resize)
    if sums[6] > 0:
        mean = sums[:3] / sums[6]
        std = np.sqrt(np.maximum(sums[3:6] / sums[6] - mean**2, 0.0))
        extra |= {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
    extra["stats_images"] = sum(r.stats_images for r in results if r.split == TRAIN_SPLIT)

    def write(folder: Path) -> None:
        write_card(
            folder,
            source.name,
            splits,
            table,
            num_classes=source.num_classes,
            image_ext=image_ext,
            extra=extra,
            class_names=source.class_names,
        )

    if isinstance(storage, LocalStorage):
        write(storage.root)
    else:
        with tempfile.TemporaryDirectory(prefix="cbtlab-card-") as tmp:
            write(Path(tmp))
            for name in (MANIFEST_NAME, CARD_NAME):  # the card last
                storage.write_bytes(name, (Path(tmp) / name).read_bytes())
    raw = storage.read_bytes(CARD_NAME)
    assert raw is not None
    return json.loads(raw)


def _warn_stale(storage: Storage, plans: list[ShardPlan]) -> None:
    """Shards an earlier, bigger build left behind are not in the card; say so, keep them."""
    if not isinstance(storage, LocalStorage):
        return
    planned = {p.name for p in plans}
    stale = sorted(
        path.name
        for split in {p.split for p in plans}
        for path in storage.root.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tar")
        if path.name not in planned
    )
    if stale:
        log.warning(
            "%d shards in %s are not part of this build (e.g. %s); the card ignores them",
            len(stale),
            storage.location,
            stale[0],
        )
