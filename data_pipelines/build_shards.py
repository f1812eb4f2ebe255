"""Convert an image dataset on disk into WebDataset shards with a Parquet manifest and a card.

Sources: imagefolder (ImageNet's train/<wnid>/*.JPEG; val/ in class folders, or flat with
--val-labels), cifar10, cifar100, flowers102, pets (layouts in `cbtlab.data.sources`), and ade20k
(ADEChallengeData2016: image + mask shards, `cbtlab.data.segmentation`). Original image bytes
are kept unless --resize / --jpeg-quality ask for re-encoding (ade20k: never resized). Each
shard is a Ray task; --local writes in this process instead, --local --workers N in N
processes. Run the same command again to resume: complete shards are kept, missing or partial
ones rebuilt. Check the result with verify_shards.py.
Every image is decoded: images that do not are all listed and the build stops (exit 1), or,
with --skip-bad, they are left out and listed in the card (extra.skipped_images).

On one machine (local Ray, or no Ray with --local):
    python data_pipelines/build_shards.py --source imagefolder --input /data/imagenet \\
        --output /data/imagenet-wds --val-labels /data/imagenet/LOC_val_solution.csv
    python data_pipelines/build_shards.py --source cifar10 --input /data/cifar-10-batches-py \\
        --output /data/cifar10-wds --samples-per-shard 5000 --local
On a Ray cluster (input and output on storage every node sees, or an s3:// / gs:// output):
    ray job submit --working-dir . -- python data_pipelines/build_shards.py \\
        --source imagefolder --input /shared/imagenet --output /shared/imagenet-wds \\
        --val-labels /shared/imagenet/LOC_val_solution.csv --max-shard-bytes 500M \\
        --resize 256 --jpeg-quality 90
(`ray job submit` sets RAY_ADDRESS for the job; --address HOST:PORT joins a cluster from outside.)
Into S3 or an S3-compatible store (`pip install 'cbtlab[s3]'`; credentials from AWS_ACCESS_KEY_ID
and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL for MinIO, Ceph, ...; docs/data.md):
    python data_pipelines/build_shards.py --source imagefolder --input /data/imagenet \\
        --output s3://bucket/imagenet-wds --val-labels /data/imagenet/LOC_val_solution.csv
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.data.cli import build_main

if __name__ == "__main__":
    sys.exit(build_main(prog="build_shards.py"))
