"""Serve the project's MLflow store in the MLflow UI (and optuna-dashboard), until Ctrl-C.

    python dashboards/serve.py                        # http://127.0.0.1:5000, the default store
    python dashboards/serve.py --port 0               # any free port (printed)
    python dashboards/serve.py --tracking-uri sqlite:////data/mlflow.db --host 0.0.0.0
    python dashboards/serve.py --optuna               # + optuna-dashboard on the latest search
    python dashboards/serve.py --optuna --study rep_count_ablation   # that study's latest search
The store is MLFLOW_TRACKING_URI, else <CBTLAB_HOME>/mlflow.db (see `cbtlab where`); a study's
report (python dashboards/study_report.py) is under report/ on its parent run's Artifacts tab.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.serve import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
