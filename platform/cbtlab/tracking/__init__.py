"""Experiment tracking: the MLflow schema and its one reader (`cbtlab.tracking.schema`), the
driver-side writer and provenance."""

from cbtlab.tracking.mlflow_tracker import StudyTracker
from cbtlab.tracking.provenance import (
    git_state,
    package_versions,
    provenance_differences,
    provenance_tags,
)

__all__ = [
    "StudyTracker",
    "git_state",
    "package_versions",
    "provenance_differences",
    "provenance_tags",
]
