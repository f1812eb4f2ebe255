"""Benchmark our WebDataset loader against webdataset's WebLoader and torch's DataLoader over an
ImageFolder (persistent workers, the same work per image) on the same JPEGs.

    python data_pipelines/bench_loader.py                       # = cbtlab data bench
    python data_pipelines/bench_loader.py --cache warm          # the files stay in the page cache
    python data_pipelines/bench_loader.py --images 1000 --workers 4 --root /tmp/bench

Makes an ImageNet-like JPEG ImageFolder tree and its WebDataset shards (in a temporary folder,
or under --root), then prints shard-writing throughput, each loader's images/s (medians of
interleaved repeats; by default every file is dropped from the page cache before each epoch, as
a dataset larger than memory is read) and CPU time per image, a per-image cost breakdown (the
manifest checksum check included) and, last, `ours/best library path images/s ratio: X.XX`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.perf.loader import bench_main

if __name__ == "__main__":
    sys.exit(bench_main(prog="bench_loader.py"))
