"""Studies: search spaces, the Tune runner and its MLflow callback."""

from cbtlab.tune.study import StudyResult, StudySpec, run_study

__all__ = ["StudyResult", "StudySpec", "run_study"]
