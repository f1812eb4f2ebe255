"""Logging a benchmark to MLflow: one run per invocation, its settings as params, one metric
per measured row, provenance tags, and the table as text and Parquet artifacts.

MLflow is imported only when a run is logged: the benchmarks also run on bare GPU machines
whose Python has no MLflow (`mlflow_installed()` tells the command line to print only)."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtlab.paths import default_tracking_uri


def mlflow_installed() -> bool:
    """Whether MLflow can be imported here (without importing it)."""
    return importlib.util.find_spec("mlflow") is not None


def log_benchmark(
    experiment: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
    table_text: str,
    tracking_uri: str = "",
) -> tuple[str, str]:
    """Log one benchmark run; returns (tracking URI, run id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Lazy: cbtlab.tracking imports MLflow, which bare GPU machines running benchmarks lack.
    from cbtlab.tracking.mlflow_tracker import StudyTracker
    from cbtlab.tracking.provenance import provenance_tags

    uri = tracking_uri or default_tracking_uri()
    tracker = StudyTracker(uri, experiment)
    run_id = tracker.start_run(experiment, params=params, tags=provenance_tags())
    try:
        tracker.log_metrics(run_id, metrics, step=0)
        tracker.log_text(run_id, table_text + "\n", f"{experiment}.txt")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{experiment}.parquet"
            pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), path)
            tracker.log_artifact(run_id, path)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return uri, run_id
