"""Command lines of the data pipelines (`data_pipelines/build_shards.py`, `verify_shards.py`)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from cbtlab.data.build import BuildError, Encoding, UndecodableImages, build_shards
from cbtlab.data.remote import explain
from cbtlab.data.segmentation import ADE20KSource
from cbtlab.data.sources import SOURCES, Source, SourceError, open_source
from cbtlab.data.verify import verify_shards

# The classification sources and ADE20K's (image + mask; `cbtlab data ade20k` builds it too).
BUILD_SOURCES = (*SOURCES, ADE20KSource.kind)
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    """`500000000`, `500M`, `1G`, `512MiB` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 500M, 1G, 2000000)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or ""])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Build WebDataset shards, a Parquet manifest and a dataset card."
    )
    parser.add_argument("--source", required=True, choices=BUILD_SOURCES, help="the input's layout")
    parser.add_argument("--input", required=True, help="the dataset's folder")
    parser.add_argument("--output", required=True, help="a folder, or an fsspec URL (s3://...)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="0: no count limit (default 1000)"
    )
    parser.add_argument(
        "--max-shard-bytes", type=byte_size, default=None, help="e.g. 500M; default: no limit"
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffles the training order")
    parser.add_argument(
        "--resize", type=int, default=None, help="downscale the shorter side to this many pixels"
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=None, help="re-encode every image as JPEG (1..100)"
    )
    parser.add_argument(
        "--val-labels", default=None, help="label file for a flat val/ folder (imagefolder)"
    )
    parser.add_argument("--name", default="", help="the dataset's name in its card")
    parser.add_argument(
        "--stats-samples", type=int, default=10_000, help="training images for the mean/std"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS)")
    where.add_argument("--local", action="store_true", help="write on this machine, no Ray")
    parser.add_argument(
        "--workers", type=int, default=1, help="with --local: processes writing shards"
    )
    parser.add_argument("--cpus-per-task", type=float, default=0.5, help="Ray CPUs per shard")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out the images that do not decode, listing them in the card "
        "(extra.skipped_images); without it, the build lists them all and stops",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def build_main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers != 1 and not args.local:
        parser.error("--workers applies with --local (on Ray, every shard is a task)")
    try:
        source = _open_source(args)
        encoding = Encoding(resize=args.resize, jpeg_quality=args.jpeg_quality)
    except (SourceError, ValueError) as exc:
        parser.error(str(exc))
    try:
        result = build_shards(
            source,
            args.output,
            samples_per_shard=args.samples_per_shard or None,
            max_shard_bytes=args.max_shard_bytes,
            seed=args.seed,
            encoding=encoding,
            stats_samples=args.stats_samples,
            local=args.local,
            address=args.address,
            cpus_per_task=args.cpus_per_task,
            progress=not args.quiet,
            skip_bad=args.skip_bad,
            workers=args.workers,
        )
    except UndecodableImages as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    except (SourceError, BuildError) as exc:  # the input's fault (a bad mask), or a shard's
        print(
            f"{parser.prog}: {exc}\nfinished shards are kept: run the same command to resume",
            file=sys.stderr,
        )
        return 1
    except (ValueError, ImportError) as exc:  # a setting, or a package the output needs
        parser.error(str(exc))
    except OSError as exc:  # the output's storage: a missing bucket, denied credentials, ...
        print(
            f"{parser.prog}: cannot write {args.output}: {explain(args.output, exc)}",
            file=sys.stderr,
        )
        return 1
    counts = ", ".join(f"{split} {n:,}" for split, n in result.num_samples.items())
    print(
        f"{result.location}: {len(result.written)} shards written, {len(result.skipped)} "
        f"already complete; {counts} samples, {result.card['num_classes']} classes"
    )
    skipped = result.card["extra"].get("skipped_images", [])
    if skipped:
        print(
            f"left out {len(skipped)} images that do not decode (the card's "
            f"extra.skipped_images): {', '.join(item['file'] for item in skipped)}"
        )
    return 0


def _open_source(args: argparse.Namespace) -> Source:
    if args.source != ADE20KSource.kind:
        return open_source(args.source, args.input, val_labels=args.val_labels, name=args.name)
    if args.val_labels is not None:
        raise SourceError("a validation label file only applies to imagefolder, not ade20k")
    return ADE20KSource(args.input, name=args.name)


def verify_main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Exit 0 when the shards are clean, 1 when problems were found."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Check every shard of a dataset against its manifest and card."
    )
    parser.add_argument("location", help="the dataset's folder or URL (holds card.json)")
    parser.add_argument("--workers", type=int, default=4, help="shards checked at once")
    parser.add_argument("--limit", type=int, default=50, help="problems listed at most")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    try:
        report = verify_shards(args.location, workers=args.workers, progress=not args.quiet)
    except ImportError as exc:
        parser.error(str(exc))
    except OSError as exc:  # the storage: a missing bucket, denied credentials, ...
        print(
            f"{parser.prog}: cannot read {args.location}: {explain(args.location, exc)}",
            file=sys.stderr,
        )
        return 1
    print(report.summary(limit=args.limit))
    return 0 if report.ok else 1
