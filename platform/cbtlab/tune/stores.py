"""Where a study keeps its state, checked before any trial starts.

A study's state lives in three stores: the MLflow tracking store (runs, params, metrics), the
Optuna study of a search, and the Ray storage path (Tune's experiment state, the trials'
checkpoints, the resume state `cbtlab_study.json`). On one machine all three are local files;
on a cluster the storage path is shared (s3://, gs://, ...) and so must the other two be: a
SQLite file on the head node is lost with it, and is not shared between drivers.

- `check_shared_stores` refuses a remote storage path beside a local MLflow or Optuna store
  (a `ConfigError` naming the flag, saying what to pass). `StudySpec.validate` calls it.
- `check_study_stores` connects to each store the study will write (the Optuna database, the
  object store under the storage path, with a write of one small object) and fails with one
  `ConnectionError` per problem (unreachable, a refused password or credentials, a missing
  bucket) before the study writes anything, so nothing half-written is left for `--resume`.
- `move_secrets` takes a password out of a URL into the environment variable its client reads
  (`PGPASSWORD`, `MLFLOW_TRACKING_PASSWORD`), so that it is not written down with the study
  (its resume state, the searcher Tune pickles onto shared storage).
Every URL that reaches a message is redacted (`cbtlab.paths.redact_url`).
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlparse

import pyarrow.fs
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from cbtlab.overrides import ConfigError
from cbtlab.paths import redact_url

# Seconds to wait for a database's or an object store's answer before calling it unreachable.
CONNECT_TIMEOUT_S = 10
# The object written (then deleted) under a remote storage path to check the credentials.
WRITE_CHECK = ".cbtlab-write-check"


def is_remote_path(path: str) -> bool:
    """Whether `path` is a URI of shared storage (s3://, gs://, ...), not a local folder."""
    return "://" in path and urlparse(path).scheme not in ("file", "local")


def is_local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI or an Optuna storage URL names a file on this machine:
    a SQLite database, a file: URI or a plain path (empty: the local default)."""
    scheme = urlparse(uri).scheme if "://" in uri or uri.startswith("file:") else ""
    return not uri or scheme in ("", "file") or scheme.startswith("sqlite")


def check_shared_stores(
    storage_path: str, tracking_uri: str, optuna_storage: str, *, search: bool
) -> None:
    """Refuse a remote `storage_path` beside a local MLflow store, or (for a search) beside a
    local or default Optuna store: each names the flag to pass."""
    if not is_remote_path(storage_path):
        return
    if is_local_store(tracking_uri):
        raise ConfigError(
            "--tracking-uri",
            f"the results go to shared storage ({storage_path}) but MLflow would write to "
            f"{redact_url(tracking_uri)}, a file on this machine that other nodes and a later "
            "--resume cannot see; pass the tracking server, e.g. --tracking-uri "
            "http://mlflow-host:5000 (or set MLFLOW_TRACKING_URI)",
        )
    if search and is_local_store(optuna_storage):
        where = redact_url(optuna_storage) if optuna_storage else "a SQLite file on this machine"
        raise ConfigError(
            "--optuna-storage",
            f"the results go to shared storage ({storage_path}) but the search's Optuna study "
            f"would be kept in {where}; pass a shared database, e.g. --optuna-storage "
            "postgresql://user@db-host:5432/optuna (the password in PGPASSWORD)",
        )


def move_secrets(url: str) -> str:
    """`url` without its password, which goes to this process's environment instead, where
    the client library reads it: `PGPASSWORD` for PostgreSQL (libpq), `MLFLOW_TRACKING_USERNAME`
    and `MLFLOW_TRACKING_PASSWORD` for an MLflow server. What a study writes down (its params,
    its resume state, Tune's pickled searcher on shared storage) then holds no password."""
    if "://" not in url:
        return url
    if urlparse(url).scheme in ("http", "https"):
        parsed = urlparse(url)
        if parsed.password is None:
            return url
        os.environ["MLFLOW_TRACKING_USERNAME"] = parsed.username or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = parsed.password
        host = parsed.hostname or ""
        netloc = f"{host}:{parsed.port}" if parsed.port else host
        return parsed._replace(netloc=netloc).geturl()
    try:
        parsed_db = make_url(url)
    except ArgumentError:
        return url
    if not parsed_db.password or not parsed_db.drivername.startswith("postgresql"):
        return url
    os.environ["PGPASSWORD"] = str(parsed_db.password)
    bare = URL.create(
        parsed_db.drivername,
        username=parsed_db.username,
        host=parsed_db.host,
        port=parsed_db.port,
        database=parsed_db.database,
        query=parsed_db.query,
    )
    return bare.render_as_string(hide_password=False)


def check_database(url: str, what: str) -> None:
    """Connect to the database at `url` (`what` names it in the message) and fail with a
    ConnectionError that says why: unreachable, the password refused, no such database."""
    if is_local_store(url):
        return
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        hint = ""
        if "password" in reason:
            hint = " (the password comes from the URL or PGPASSWORD)"
        elif isinstance(exc, ImportError):
            hint = " (pip install 'cbtlab[postgres]')"
        raise ConnectionError(f"cannot use the {what} {redact_url(url)}: {reason}{hint}") from None


def check_object_store(path: str, what: str) -> None:
    """Write and delete one small object under the remote `path` (`what` names it in the
    message): a missing bucket, refused credentials or an unreachable endpoint each fail with
    a ConnectionError saying so."""
    if not is_remote_path(path):
        return
    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot open the {what} {path}: {exc}") from None
    bucket = inner.split("/", 1)[0]
    probe = f"{inner.rstrip('/')}/{WRITE_CHECK}-{secrets.token_hex(4)}"
    try:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise ConnectionError(
                f"the {what} {path} is in the bucket {bucket!r}, which does not exist; "
                "create it first (e.g. aws s3 mb s3://" + bucket + ")"
            )
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0]
        hint = ""
        if any(word in reason.upper() for word in ("ACCESS", "CREDENTIAL", "SIGNATURE", "403")):
            hint = " (S3 credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the role)"
        raise ConnectionError(f"cannot write the {what} {path}: {reason}{hint}") from None


def check_study_stores(storage_path: str, optuna_url: str) -> None:
    """Before a study writes anything: its results folder and its Optuna database (a search's,
    "" for a grid) answer, with the credentials this process has."""
    check_object_store(storage_path, "results storage (--storage-path)")
    if optuna_url:
        check_database(optuna_url, "Optuna storage (--optuna-storage)")
