"""Shared fixtures: every test's state (data cache, MLflow, Ray results) goes to temp folders."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# Without CUDA, Triton kernels (the CBSA kernels, tests/test_cbsa_kernels.py) run under Triton's
# interpreter. It must be set before Triton is first imported: Triton's own helpers (tl.zeros,
# ...) are defined as interpreted or compiled functions at that moment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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

    from cbtlab.cluster import connect_ray

    connect_ray(None)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class FinishedStudy:
    """A grid study run once per test session: where it logged and what it printed."""

    uri: str
    storage: Path
    name: str
    code: int
    out: str


@pytest.fixture(scope="session")
def tiny_variant_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory):
    """A real grid study (cbsa and softmax x 3 seeds, 1 epoch, one worker per trial, Rc probed
    every epoch), shared by the tests of grid statistics and of study reports: each such study
    costs a minute or two of Ray."""
    from cbtlab.tune.cli import variant_comparison_main

    root = tmp_path_factory.mktemp("tiny_variant_study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = variant_comparison_main(
            [
                "--variants", "cbsa", "softmax",
                "--seeds", "3",
                "--epochs", "1",
                "--workers", "1",
                "--name", "tiny_grid",
                "--tracking-uri", uri,
                "--storage-path", str(root / "ray"),
                "--set", "model.depth=1",
                "--set", "model.embed_dim=24",
                "--set", "train.probe_every=1",
                "--set", "train.probe_samples=16",
            ]
        )  # fmt: skip
    return FinishedStudy(uri, root / "ray", "tiny_grid", code, out.getvalue())


@dataclass(frozen=True)
class ClusterServices:
    """The services of a cluster, on 127.0.0.1 (tests/services.py), and their secrets."""

    postgres: Any
    s3: Any
    mlflow: Any
    bucket: str

    def secrets(self) -> list[str]:
        return [self.postgres.password, self.s3.secret_key, self.mlflow.password]


@pytest.fixture(scope="session")
def cluster_services(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL (role with a password; databases mlflow, mlflow_auth, optuna), moto's S3 server
    (bucket `cbtlab`) and an MLflow server with basic auth on both, started once per session
    for the tests that need them and stopped after the last. Skipped where PostgreSQL's server
    is not installed, unless CBTLAB_REQUIRE_SERVICES is set (CI), which fails instead."""
    import secrets

    from services import mlflow_server, postgres, postgres_bin, s3_server

    if postgres_bin("postgres") is None:
        message = "PostgreSQL's server is not installed (make services installs it)"
        if os.environ.get("CBTLAB_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("services")
    pg_password, ml_password = secrets.token_hex(12), secrets.token_hex(12)
    with (
        postgres(root / "pg", ["mlflow", "mlflow_auth", "optuna"], pg_password) as pg,
        s3_server(root / "s3", ["cbtlab"]) as s3,
        mlflow_server(
            root / "mlflow",
            pg.url("mlflow"),
            pg.url("mlflow_auth"),
            "s3://cbtlab/mlartifacts",
            s3,
            ml_password,
        ) as ml,
    ):
        yield ClusterServices(pg, s3, ml, "cbtlab")
