"""Benchmark our WebDataset loader against torchvision's ImageFolder on the same JPEGs.

    python data_pipelines/bench_loader.py                       # ~1 minute on 2 cores
    python data_pipelines/bench_loader.py --cache warm          # the files stay in the page cache
    python data_pipelines/bench_loader.py --images 1000 --workers 4 --root /tmp/bench
Makes an ImageNet-like JPEG ImageFolder tree and its WebDataset shards (in a temporary folder,
or under --root), then prints shard-writing throughput, both loaders' images/s (medians of
interleaved repeats; by default every file is dropped from the page cache before each epoch, as
a dataset larger than memory is read) and CPU time per image, a per-image cost breakdown and,
last, `webdataset/imagefolder images/s ratio: X.XX`.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.perf.loader import CACHE_MODES, BenchConfig, run_bench


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=None, help="keep the data here")
    for field in dataclasses.fields(BenchConfig):
        flag = "--" + field.name.replace("_", "-")
        choices = CACHE_MODES if field.name == "cache" else None
        kind = type(field.default)
        parser.add_argument(
            flag, type=kind, default=field.default, choices=choices, help=field.name
        )
    args = parser.parse_args()
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    for line in run_bench(cfg, args.root).lines():
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
