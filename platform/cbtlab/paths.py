"""Where cbtlab keeps its state on one machine.

Everything lives under `CBTLAB_HOME` (default `~/.cbtlab`): the built-in datasets' shards
(`data/`), the MLflow SQLite store and artifacts (`mlflow.db`, `mlartifacts/`) and Ray's
results (`ray_results/`). Each has its own override (`MLFLOW_TRACKING_URI`, flags).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cbtlab_home() -> Path:
    return Path(os.environ.get("CBTLAB_HOME", Path.home() / ".cbtlab")).expanduser().resolve()


def data_home() -> Path:
    return cbtlab_home() / "data"


def ray_results_home() -> Path:
    return cbtlab_home() / "ray_results"


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite file under `CBTLAB_HOME`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{cbtlab_home() / 'mlflow.db'}"


def unredact_url(url: str) -> str:
    """A URL whose password `redact_url` hid, without it: its client then reads the password
    from the environment (PostgreSQL's PGPASSWORD, say)."""
    return url.replace(":***@", "@")


def redact_url(url: str) -> str:
    """A database URL with its password hidden (as it may be logged or written to disk)."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def filesystem_of(path: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a local path or a URI (Ray's storage paths), and the path in
    it (a local one made absolute): where the platform keeps its own small records beside Ray's
    results (`cbtlab_study.json`, `cbtlab_run.json`)."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())
