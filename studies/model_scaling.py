"""Model scaling (the paper's Table 3): CBT-T/S/B/L pre-trained, then fine-tuned downstream.

Every size trains with the same seeds; each is then fine-tuned from its pre-trained checkpoint
on every --downstream dataset (prebuilt shards: CIFAR-10/100, Flowers-102, Pets, built with
data_pipelines/build_shards.py). Prints and logs the scaling table: parameters, FLOPs and
top-1 (mean ± 95% CI over seeds) per size and stage. See cbtlab.tune.scaling.

On one machine (local Ray, the built-in digits; the sizes at the paper's proportions on the
digits skeleton, widths 48/96/192/256; about 10 minutes on 2 CPUs):
    python studies/model_scaling.py
With repeated seeds and a downstream set of your own (a shard folder with the digits' channels):
    python studies/model_scaling.py --seeds 3 --downstream mine=/data/mine-wds
On a GPU cluster, the paper's recipe (150 epochs of Lion on ImageNet-1k, then the reference
fine-tuning recipe on each downstream set):
    ray job submit --working-dir . -- python studies/model_scaling.py --address auto \
        --preset imagenet --data-root s3://bucket/imagenet-wds \
        --downstream cifar10=s3://bucket/cifar10-wds cifar100=s3://bucket/cifar100-wds \
            flowers102=s3://bucket/flowers102-wds pets=s3://bucket/pets-wds \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/model_scaling.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import model_scaling_main

if __name__ == "__main__":
    sys.exit(model_scaling_main())
