"""How many representatives does CBSA need? The representative-count ablation.

On one machine (local Ray, the built-in digits, MLflow in ~/.cbtlab/mlflow.db):
    python studies/rep_count_ablation.py
On a cluster:
    ray job submit --working-dir . -- python studies/rep_count_ablation.py --address auto
Options: `python studies/rep_count_ablation.py --help`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree (e.g. a ray job's working dir) with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.tune.studies import rep_count_main

if __name__ == "__main__":
    sys.exit(rep_count_main())
