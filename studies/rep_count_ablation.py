"""How many representatives does CBSA need? The representative-count ablation.

On one machine (local Ray, the built-in digits, MLflow in ~/.cbtlab/mlflow.db; Optuna TPE +
ASHA, 6 trials of 12 epochs, one seed):
    python studies/rep_count_ablation.py
Every grid with 3 paired seeds, then statistics against 4x4 (no ASHA in a grid):
    python studies/rep_count_ablation.py --grid --seeds 3 --grids 1x1,2x2,4x4,8x8 \
        --baseline model.rep_grid=4x4
On a cluster:
    ray job submit --working-dir . -- python studies/rep_count_ablation.py --address auto
The paper's recipe (150 epochs of Lion) on prebuilt ImageNet-1k shards:
    ray job submit --working-dir . -- python studies/rep_count_ablation.py --address auto \
        --preset imagenet --data-root s3://bucket/imagenet-wds --grid --seeds 3
Options: `python studies/rep_count_ablation.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import rep_count_main

if __name__ == "__main__":
    sys.exit(rep_count_main())
