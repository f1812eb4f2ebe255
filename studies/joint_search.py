"""The joint search the platform is for: the attention variant, the representative count, its
pooling and the step-size initialisation, searched together by Optuna TPE with ASHA.

The space is conditional (an Optuna define-by-run function, `cbtlab.tune.spec.ConditionalSpace`):
a parameter is sampled only for the variants that read it, so that TPE never learns from a
dead one (a trial that does not sample a key keeps the base config's value, which its variant
ignores):
    model.attention       cbsa, mssa, tssa, agent, linear, softmax          (every trial)
    model.rep_grid        --grids                                           (cbsa, agent)
    model.rep_pool_stride 0 = adaptive pooling, 1 = overlapping k x k windows every patch,
                          k = side - g + 1 (model.rep_pool_kernel, set with it)
                                          (cbsa, on its square grids g x g with 1 < g < side)
    model.step_init       --step-inits: normal, constant, zero              (cbsa, linear)
    model.step_scale      --step-scales: 0.1, 1                 (cbsa, linear; not with zero)
Grids: 1x1,2x2,4x2,4x4,8x4,8x8 on the digits' 8 x 8 patch grid, 1x1,2x2,4x4,7x7,8x8 on the
14 x 14 patch grid of 224 px ImageNet images (patch 16).

Every trial is compared at the equal budget (the epoch every finished trial reached); the
answer and Optuna's parameter importances there (over all trials: the variant beside the rest;
over each variant's trials: its own parameters) are printed and logged on the MLflow parent run
(answer.txt, importances.txt, importances.json).

A few minutes on 2 CPU cores (6 trials of 2 epochs, a 1-layer 24-wide model, grace period 1):
    python studies/joint_search.py --preset smoke
The digits at full size (20 trials of 12 epochs, ASHA with grace period 3):
    python studies/joint_search.py
The paper's recipe on prebuilt ImageNet-1k shards, on a GPU cluster (30 trials, grace 15):
    ray job submit --working-dir . -- python studies/joint_search.py --address auto \\
        --preset imagenet --data-root s3://bucket/imagenet-wds
Go on after the driver stopped: `--resume`. Options: `python studies/joint_search.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import joint_search_main

if __name__ == "__main__":
    sys.exit(joint_search_main())
