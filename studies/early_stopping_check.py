"""Does early stopping find the right answer? The grid (every cell x 3 seeds, the ground truth)
and the Optuna TPE + ASHA search over the same cells, compared: is ASHA's pick statistically
indistinguishable from the grid's best cell, and at what share of the grid's compute?

A quick run (a tiny model, 3 cells x 2 seeds x 3 epochs; a few minutes on 2 CPU cores):
    python studies/early_stopping_check.py --preset smoke
The measurement on the digits (the representative counts 1x1,2x2,4x4,8x8 x 3 seeds x 8 epochs):
    python studies/early_stopping_check.py
The attention variants (6 attentions x 3 seeds), fewer epochs:
    python studies/early_stopping_check.py --study variants --epochs 4
Options: `python studies/early_stopping_check.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.cli import early_stopping_check_main

if __name__ == "__main__":
    sys.exit(early_stopping_check_main())
