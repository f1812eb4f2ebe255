"""Segmentation decoders (the paper's Fig. 8 left): a ViT encoder with a mask-transformer decoder
whose attention (CBSA, DEPICT's MSSA, Segmenter's softmax) and depth vary, every cell with the
same seeds; val/miou with paired statistics vs the first decoder, decoder FLOPs and pairwise
similarities logged per trial (model/decoder_flops, model/decoder_similarities).

On this machine (generated shapes in the ADE20K layout, a tiny encoder, 3 x 2 cells x 2 seeds
of 3 epochs, two at once: about 6 minutes on 2 cores; MLflow in ~/.cbtlab/mlflow.db):
    python studies/segmentation_decoders.py --preset smoke    # then its report (mIoU vs FLOPs)
On a GPU cluster, Segmenter's ADE20K recipe on shards from `cbtlab data ade20k`:
    ray job submit --working-dir . -- python studies/segmentation_decoders.py --address auto \
        --preset ade20k --data-root s3://bucket/ade20k-wds --seeds 3 \
        --set task.encoder_weights=/weights/vit_tiny_in21k.npz \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/segmentation_decoders.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.study_reports import segmentation_decoders_main

if __name__ == "__main__":
    sys.exit(segmentation_decoders_main())
