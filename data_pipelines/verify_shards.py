"""Verify a sharded dataset: every shard of every split in its card, every sample against the
manifest (sha256, label), every image decoded. Exit 0 when clean, 1 with a list of problems
(missing or truncated shards, corrupt images, missing or extra keys) otherwise.

    python data_pipelines/verify_shards.py /data/imagenet-wds
    python data_pipelines/verify_shards.py s3://bucket/imagenet-wds --workers 16

s3:// needs `pip install 'cbtlab[s3]'` and the AWS environment (docs/data.md, "Shards on object
storage"); a missing bucket or denied credentials are named as such.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.data.cli import verify_main

if __name__ == "__main__":
    sys.exit(verify_main(prog="verify_shards.py"))
