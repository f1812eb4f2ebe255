"""Real services for the multi-node tests, each started by the test on 127.0.0.1 and stopped after
it: PostgreSQL (a cluster of its own in a temp folder, a role with a password), an S3-compatible
server (moto's standalone server, as s3fs's own tests use) and an MLflow tracking server with
MLflow's basic-auth app, its runs in PostgreSQL and its artifacts on the S3 server.

These are the services of docs/cluster.md, on one machine; nothing here is a mock of our own.
PostgreSQL refuses to run as root: as root its programs run as the `postgres` user that
Debian's package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (Debian keeps them off PATH, under /usr/lib/postgresql)."""
    for folder in PG_BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def wait_for(check, what: str, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise TimeoutError(f"{what} did not start in {timeout_s:g} s\n{tail}")
        time.sleep(0.3)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL, of `process` and its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str

    def url(self, database: str, *, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def postgres(folder: Path, databases: list[str], password: str) -> Iterator[Postgres]:
    """A PostgreSQL server of its own on a free port: role `cbtlab` with `password`
    (scram-sha-256 on TCP, no trust), the given databases created."""
    initdb, server = postgres_bin("initdb"), postgres_bin("postgres")
    if not (initdb and server):
        raise RuntimeError("PostgreSQL's server is not installed (apt install postgresql)")
    # As root the server runs as `postgres`, which cannot enter pytest's private temp folders:
    # its cluster lives in a folder of its own under /tmp, removed afterwards; the log stays.
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "postgres.log"
    home = Path(tempfile.mkdtemp(prefix="cbtpg"))
    data, pwfile = home / "data", home / "pw"
    pwfile.write_text(password + "\n")
    runas: dict = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        for path in (home, pwfile):
            os.chown(path, account.pw_uid, account.pw_gid)
        runas = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    init = subprocess.run(
        [initdb, "-D", str(data), "-U", "cbtlab", "--pwfile", str(pwfile),
         "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8"],
        capture_output=True, text=True, **runas,
    )  # fmt: skip
    pwfile.unlink()
    if init.returncode:
        shutil.rmtree(home, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{init.stdout}{init.stderr}")
    port = free_port()
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    process = subprocess.Popen(
        [server, "-D", str(data), *options.split()],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **runas,
    )  # fmt: skip
    try:
        wait_for(lambda: port_open(port), "PostgreSQL", 60, log)
        service = Postgres(port, "cbtlab", password)
        _create_databases(service, databases)
        yield service
    finally:
        stop(process)
        shutil.rmtree(home, ignore_errors=True)


def _create_databases(service: Postgres, databases: list[str]) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg.connect(service.url("postgres"), autocommit=True)
            break
        except psycopg.OperationalError:  # still starting up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    with conn.cursor() as cursor:
        for name in databases:
            cursor.execute(f'CREATE DATABASE "{name}"')
    conn.close()


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """What a client's environment needs: the endpoint and the credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


@contextlib.contextmanager
def s3_server(folder: Path, buckets: list[str]) -> Iterator[S3]:
    """moto's standalone S3-compatible server on a free port, with `buckets` created."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "moto.log"
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: port_open(port), "the S3 server", 60, log)
        service = S3(f"http://127.0.0.1:{port}", "cbtlab-test-key", secrets.token_hex(12))
        for bucket in buckets:
            service.client().create_bucket(Bucket=bucket)
        yield service
    finally:
        stop(process)


@dataclass(frozen=True)
class MLflowServer:
    uri: str
    username: str
    password: str


@contextlib.contextmanager
def mlflow_server(
    folder: Path, backend_uri: str, auth_db_uri: str, artifacts: str, s3: S3, password: str
) -> Iterator[MLflowServer]:
    """`mlflow server` with the basic-auth app: runs in `backend_uri`, users in `auth_db_uri`,
    artifacts proxied to `artifacts` on `s3`; its admin `admin` has `password`."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log, ini = free_port(), folder / "mlflow.log", folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db_uri}\nadmin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**os.environ, **s3.env(), "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    env["MLFLOW_S3_ENDPOINT_URL"] = s3.endpoint
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # CSRF tokens of the auth app
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
        cwd=folder,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(uri), "the MLflow server", 180, log)
        yield MLflowServer(uri, "admin", password)
    finally:
        stop(process)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
