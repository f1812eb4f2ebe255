"""Shared fixtures: every test's state (data cache, MLflow, Ray results) goes to temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point CBTLAB_HOME at a temporary folder and drop any user MLflow store."""
    home = tmp_path_factory.mktemp("cbtlab_home")
    old = {k: os.environ.get(k) for k in ("CBTLAB_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["CBTLAB_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def digits_root(isolated_home: Path) -> Path:
    """The digits shards with the default split, built once per test session."""
    from cbtlab.config import DataConfig
    from cbtlab.data import prepare_dataset

    return prepare_dataset(DataConfig())


@pytest.fixture(scope="session")
def ray_session(isolated_home: Path):
    """One local Ray instance for every test that needs it, shut down at the end."""
    import ray

    from cbtlab.tune.study import connect_ray

    connect_ray(None)
    yield
    ray.shutdown()
