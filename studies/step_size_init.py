"""How should CBSA's learnable step sizes start? The step-size initialisation ablation.

Cells of model.step_init x model.step_scale: N(0, 1) as in the reference code (the baseline),
N(0, 0.1), the constants 1, 0.1, -0.1, -1 and zero, each with the same 3 seeds; the driver
then compares each with the baseline, paired by seed, and logs stats.parquet on the parent run.

On one machine (local Ray, the built-in digits, MLflow in ~/.cbtlab/mlflow.db; 7 x 3 = 21
trials of 12 epochs, each about a minute on 2 CPUs):
    python studies/step_size_init.py
Other cells (init:scale; zero takes no scale; N(0, s) needs s >= 0):
    python studies/step_size_init.py --cells normal:1,constant:0.5,constant:-0.5,zero --seeds 5
On a GPU cluster, the paper's recipe (150 epochs of Lion) on prebuilt ImageNet-1k shards:
    ray job submit --working-dir . -- python studies/step_size_init.py --address auto \
        --preset imagenet --data-root s3://bucket/imagenet-wds \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/step_size_init.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import step_size_init_main

if __name__ == "__main__":
    sys.exit(step_size_init_main())
