"""Decoder robustness (the paper's Fig. 8 right): each decoder (CBSA, MSSA, softmax) trained
with the same seeds, then its last checkpoint evaluated with Gaussian noise of several scales
(times the weights' rms) added to the decoder's projection matrices: mIoU against the scale
per decoder, with 95% intervals over seeds (noise_robustness.json and .png on the parent run,
noise/<scale>/miou on every trial's run). The noise is applied to the trained decoders; no
retraining per noise level.

On this machine (generated shapes, a tiny encoder, 3 decoders x 2 seeds of 3 epochs; about 5
minutes on 2 cores):
    python studies/decoder_robustness.py --preset smoke
On a GPU cluster, Segmenter's ADE20K recipe on shards from `cbtlab data ade20k`:
    ray job submit --working-dir . -- python studies/decoder_robustness.py --address auto \
        --preset ade20k --data-root s3://bucket/ade20k-wds --seeds 3 --depth 2 \
        --set task.encoder_weights=/weights/vit_tiny_in21k.npz \
        --tracking-uri http://mlflow.internal:5000 --storage-path s3://bucket/cbtlab
Options: `python studies/decoder_robustness.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.study_reports import decoder_robustness_main

if __name__ == "__main__":
    sys.exit(decoder_robustness_main())
