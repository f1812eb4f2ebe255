"""A study's shared state checked before any trial starts (cbtlab.tune.stores): a remote
results folder beside a local MLflow or Optuna store is refused; passwords leave the URLs; an
unreachable database, a refused password, a missing bucket and an unreachable object store
each get one message, with no password in it. Against real services (tests/services.py)."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import pytest

from cbtlab.config import ConfigError
from cbtlab.tracking import StudyTracker
from cbtlab.tune.cli import rep_count_parser
from cbtlab.tune.definitions import rep_count_spec
from cbtlab.tune.stores import (
    check_database,
    check_object_store,
    check_shared_stores,
    is_local_store,
    move_secrets,
)


def _spec(*argv: str):
    return rep_count_spec(rep_count_parser().parse_args(list(argv))).validate()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_remote_results_folder_needs_shared_mlflow_and_optuna_stores() -> None:
    remote = ["--storage-path", "s3://bucket/ray"]
    with pytest.raises(ConfigError, match=r"--tracking-uri: .* a file on this machine"):
        _spec(*remote, "--tracking-uri", "sqlite:////tmp/mlflow.db")
    server = ["--tracking-uri", "http://mlflow-host:5000"]
    with pytest.raises(ConfigError, match=r"--optuna-storage: .* a SQLite file on this machine"):
        _spec(*remote, *server, "--search")
    with pytest.raises(ConfigError, match=r"--optuna-storage: .*sqlite:////tmp/o.db"):
        _spec(*remote, *server, "--search", "--optuna-storage", "sqlite:////tmp/o.db")
    # What is shared passes; a grid keeps no Optuna study.
    _spec(*remote, *server, "--search", "--optuna-storage", "postgresql://u@db:5432/optuna")
    _spec(*remote, *server)
    # A local results folder may sit beside anything.
    check_shared_stores("/tmp/ray", "sqlite:////tmp/m.db", "", search=True)
    assert is_local_store("") and is_local_store("./mlruns") and is_local_store("file:///x")
    assert not is_local_store("postgresql://u@h/db") and not is_local_store("https://h")


def test_passwords_move_from_urls_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert move_secrets("postgresql://cbtlab:s3cr%40t@db:5432/optuna") == (
        "postgresql://cbtlab@db:5432/optuna"
    )
    assert os.environ["PGPASSWORD"] == "s3cr@t"
    assert move_secrets("https://alice:pw123@mlflow:5000/") == "https://mlflow:5000/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw123"
    for url in ("sqlite:////tmp/x.db", "http://mlflow:5000", "s3://b/x", ""):
        assert move_secrets(url) == url


def test_databases_are_checked_before_a_study_writes(cluster_services, monkeypatch) -> None:
    pg = cluster_services.postgres
    monkeypatch.delenv("PGPASSWORD", raising=False)
    check_database(pg.url("optuna"), "Optuna storage")  # the password from the URL
    monkeypatch.setenv("PGPASSWORD", pg.password)
    check_database(f"postgresql://{pg.user}@127.0.0.1:{pg.port}/optuna", "Optuna storage")
    wrong = f"postgresql://{pg.user}:not-the-password@127.0.0.1:{pg.port}/optuna"
    with pytest.raises(ConnectionError, match="password authentication failed") as refused:
        check_database(wrong, "Optuna storage")
    assert "not-the-password" not in str(refused.value) and "***" in str(refused.value)
    with pytest.raises(ConnectionError, match='database "nope" does not exist'):
        check_database(pg.url("nope"), "Optuna storage")
    with pytest.raises(ConnectionError, match="cannot use the Optuna storage") as down:
        check_database(f"postgresql://u:pw1@127.0.0.1:{_closed_port()}/optuna", "Optuna storage")
    assert "pw1" not in str(down.value)


def test_object_stores_are_checked_with_a_write(cluster_services, monkeypatch) -> None:
    s3 = cluster_services.s3
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    check_object_store("s3://cbtlab/ray", "results storage")
    left = s3.client().list_objects_v2(Bucket="cbtlab", Prefix="ray/").get("Contents", [])
    assert not [o["Key"] for o in left if ".cbtlab-write-check" in o["Key"]]
    with pytest.raises(ConnectionError, match="bucket 'no-such-bucket', which does not exist"):
        check_object_store("s3://no-such-bucket/ray", "results storage")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ConnectionError, match="cannot write the results storage"):
        check_object_store("s3://cbtlab/ray", "results storage")


def test_the_tracking_server_refuses_strangers(cluster_services, monkeypatch) -> None:
    ml = cluster_services.mlflow
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        urllib.request.urlopen(f"{ml.uri}/api/2.0/mlflow/experiments/search?max_results=1")
    assert unauthenticated.value.code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ml.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(ConnectionError, match=r"refused this client.*MLFLOW_TRACKING_PASSWORD"):
        StudyTracker(ml.uri, "strangers")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ml.password)
    assert StudyTracker(ml.uri, "members").experiment_id
