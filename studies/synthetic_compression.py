"""Fig. 4: the parameter-free linear variant compresses each class onto a line.

    python studies/synthetic_compression.py                # = cbtlab study synthetic
    python studies/synthetic_compression.py --classes 4 --noise 0.5 --iterations 30

Prints each class's share of energy on its top direction per iteration, saves the figure, and
logs both to MLflow (experiment `synthetic_compression`; MLFLOW_TRACKING_URI or ~/.cbtlab).
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.analysis.synthetic import synthetic_main

if __name__ == "__main__":
    sys.exit(synthetic_main(prog="synthetic_compression.py"))
