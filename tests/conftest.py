"""Shared fixtures: every test's state (data cache, MLflow, Ray results) goes to temp folders."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

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
