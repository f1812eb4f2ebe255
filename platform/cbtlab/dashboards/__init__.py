"""Dashboards over MLflow: a study's report (table, figures, HTML, logged on its parent run)
and the launcher of the MLflow UI (and optuna-dashboard) on the project's store.

`dashboards/study_report.py` and `dashboards/serve.py` are the command lines."""

from cbtlab.dashboards.report import StudyReport, build_report
from cbtlab.tracking.schema import StudyRuns, load_study

__all__ = ["StudyReport", "StudyRuns", "build_report", "load_study"]
