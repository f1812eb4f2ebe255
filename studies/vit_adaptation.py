"""ViT adaptation (the paper's Fig. 9): pretrained timm ViTs with their attention replaced by
CBSA (with or without the contraction step) or linear attention, every other weight inherited
(cbtlab.models.adapt), fine-tuned with the same seeds per attention form x ViT size on each
downstream dataset; prints each grid's statistics and logs its report (top-1 with 95% intervals
against FLOPs: report/pareto_flops.png on the parent run).

On one machine (local Ray, the built-in digits, the tiny ViT at 48 px, softmax, CBSA without
contraction and linear attention, 2 seeds x 2 epochs; a random ViT stands in for pretrained
weights unless --weights gives some; about 5 minutes on 2 CPUs):
    python studies/vit_adaptation.py --preset smoke
On a GPU cluster, with timm's ImageNet-21k weights (docs/studies.md: ViT adaptation) on storage
every worker reads, fine-tuned on the downstream shards of data_pipelines/build_shards.py:
    ray job submit --working-dir . -- python studies/vit_adaptation.py --address auto \
        --preset imagenet --sizes tiny small base \
        --weights tiny=/shared/vit/vit_tiny_patch16_224.augreg_in21k.safetensors \
            small=/shared/vit/vit_small_patch16_224.augreg_in21k.safetensors \
            base=/shared/vit/vit_base_patch16_224.augreg_in21k.safetensors \
        --downstream cifar10=s3://bucket/cifar10-wds cifar100=s3://bucket/cifar100-wds \
            flowers102=s3://bucket/flowers102-wds pets=s3://bucket/pets-wds \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/vit_adaptation.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.study_reports import vit_adaptation_main

if __name__ == "__main__":
    sys.exit(vit_adaptation_main())
