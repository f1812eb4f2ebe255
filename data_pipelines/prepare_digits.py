"""Build (or verify) the built-in digits dataset as WebDataset shards with a Parquet manifest.

    python data_pipelines/prepare_digits.py
    python data_pipelines/prepare_digits.py --set data.val_fraction=0.25 --set data.cache_dir=/data
Studies do this on first use by themselves; run it to pre-build the cache or to check it.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "digits", *sys.argv[1:]]))
