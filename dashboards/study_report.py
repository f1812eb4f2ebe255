"""Build a study's report from MLflow and log it on the study's parent run.

    python dashboards/study_report.py --study rep_count_ablation       # its latest invocation
    python dashboards/study_report.py --parent RUN_ID --tracking-uri sqlite:///path/mlflow.db
    python dashboards/study_report.py --study variant_comparison --no-log --out /tmp/report
Writes trials.parquet (one row per trial run), the PNG figures and study_report.html (the
figures embedded) to --out (default <CBTLAB_HOME>/reports/<study>-<run id>) and logs them under
report/ on the parent run; `python dashboards/serve.py` then shows them in the MLflow UI.
What each file holds: `cbtlab.dashboards.report`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.dashboards.report import report_main

if __name__ == "__main__":
    sys.exit(report_main())
