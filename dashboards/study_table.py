"""Print (and optionally save) the trial table of a study logged in MLflow.

    python dashboards/study_table.py                       # = cbtlab study table
    python dashboards/study_table.py --experiment NAME --parent RUN_ID --csv table.csv

The store is MLFLOW_TRACKING_URI, else ~/.cbtlab/mlflow.db (see `cbtlab where`).
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.table import table_main

if __name__ == "__main__":
    sys.exit(table_main(prog="study_table.py"))
