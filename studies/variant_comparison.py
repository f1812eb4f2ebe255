"""CBSA against the other attentions at equal size (the paper's Table 4), with repeated seeds.

Every variant (cbsa, mssa, tssa, agent, linear, softmax) trains in the same skeleton (width,
depth, heads) with the same 3 seeds; the driver then compares each with CBSA, paired by seed
(mean ± 95% CI, paired t / Wilcoxon, Holm, d_z) and logs stats.parquet on the parent run.

On one machine (local Ray, the built-in digits, MLflow in ~/.cbtlab/mlflow.db; 6 x 3 = 18
trials of 12 epochs, each about a minute on 2 CPUs):
    python studies/variant_comparison.py
A quick look:
    python studies/variant_comparison.py --variants cbsa mssa softmax --seeds 2 --epochs 3
On a GPU cluster, the paper's recipe (150 epochs of Lion) on prebuilt ImageNet-1k shards:
    ray job submit --working-dir . -- python studies/variant_comparison.py --address auto \
        --preset imagenet --data-root s3://bucket/imagenet-wds --seeds 3 \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/variant_comparison.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import variant_comparison_main

if __name__ == "__main__":
    sys.exit(variant_comparison_main())
