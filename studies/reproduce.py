"""Re-run a logged trial exactly, or with more seeds, and compare it with what it logged.

The same config and seed, on this machine (local Ray), checked exactly against the logged
per-epoch metrics (exit 0 when identical, 1 when not):
    python studies/reproduce.py --run-id RUN_ID
A reproducibility sweep: the logged seed and 4 more (train.seed = logged + i), their spread:
    python studies/reproduce.py --run-id RUN_ID --seeds 5
On a cluster against a tracking server (GPUs are not bit-exact: give a tolerance):
    ray job submit --working-dir . -- python studies/reproduce.py --run-id RUN_ID \
        --address auto --tracking-uri http://mlflow.internal:5000 --tolerance 1e-4
The re-runs are logged as MLflow runs nested under RUN_ID (tag cbtlab.reproduces=RUN_ID); what
is compared and logged: `cbtlab.tune.reproduce`. Options: `python studies/reproduce.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.reproduce import reproduce_main

if __name__ == "__main__":
    sys.exit(reproduce_main())
