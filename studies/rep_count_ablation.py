"""How many representatives does CBSA need? The representative-count ablation.

On one machine (local Ray, the built-in digits, MLflow in ~/.cbtlab/mlflow.db): the counts 1, 4,
16 and 64 with the same 3 seeds, every trial 8 epochs (about 10 minutes on 2 cores); it ends
with the best count at that budget, its 95% interval and the counts a paired test cannot tell
from it:
    python studies/rep_count_ablation.py
Other counts, seeds or epochs, and statistics against 4x4:
    python studies/rep_count_ablation.py --grids 1x1,2x2,4x2,4x4,8x4,8x8 --seeds 5 \
        --baseline model.rep_grid=4x4
The Optuna search (TPE + ASHA, one seed per trial) over the ten grids 1x1 ... 8x8:
    python studies/rep_count_ablation.py --search --num-samples 10
On a cluster:
    ray job submit --working-dir . -- python studies/rep_count_ablation.py --address auto
The paper's recipe (150 epochs of Lion) on prebuilt ImageNet-1k shards:
    ray job submit --working-dir . -- python studies/rep_count_ablation.py --address auto \
        --preset imagenet --data-root s3://bucket/imagenet-wds --seeds 3
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
