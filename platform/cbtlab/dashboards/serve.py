"""Serve the project's MLflow store in the MLflow UI (and, if asked, optuna-dashboard).

optuna-dashboard (`--optuna`) serves a search's Optuna storage: `--optuna-storage URL`, else
that of `--study NAME`'s latest search, else that of the latest search in the MLflow store; a
search's storage is its parent run's `study.optuna_storage` (by default `optuna.db` in the
study's results folder, `cbtlab.tune.state.optuna_storage_url`).

The MLflow UI runs as `mlflow server` on the store studies write to
(`cbtlab.paths.default_tracking_uri()`: `MLFLOW_TRACKING_URI`, else `<CBTLAB_HOME>/mlflow.db`).
For a local SQLite store its default artifact root is the `mlartifacts/` folder beside the
database, where `StudyTracker` puts every experiment it creates (`mlartifacts/<experiment>`),
so experiments made from the UI land in the same tree; existing runs' artifacts are read from
the locations recorded with them. The servers run in their own process groups, bound to
127.0.0.1 unless `--host` says otherwise; the address is printed once the UI answers; Ctrl-C
(or SIGTERM) stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cbtlab.cluster import free_port
from cbtlab.dashboards.search import storage_of
from cbtlab.paths import default_tracking_uri, redact_url
from cbtlab.tracking.schema import find_search_parent

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_OPTUNA_PORT = 8080
STOP_GRACE_S = 10.0


def local_sqlite(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def artifact_root(tracking_uri: str) -> str | None:
    """Where new experiments keep artifacts: `mlartifacts/` beside a local SQLite store (as
    `StudyTracker` does); None (MLflow's default) for any other store."""
    db = local_sqlite(tracking_uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def study_optuna_storage(tracking_uri: str, study: str | None = None) -> tuple[str, str]:
    """(storage URL, Optuna study name) of the latest Optuna search of `study` (of any study
    when None) in the MLflow store: its parent run's `study.optuna_storage`, by default the
    `optuna.db` in the study's results folder, its password taken from the environment
    (PGPASSWORD)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_search_parent(client, study)
    found = storage_of(parent.data.params)
    if found is None:
        raise LookupError(f"the search run {parent.info.run_id} names no Optuna storage")
    return found


def optuna_storage(
    given: str | None, study: str | None, tracking_uri: str
) -> tuple[str, str | None]:
    """The storage optuna-dashboard serves and the study name it holds (None: not known):
    `given` (--optuna-storage), else the storage of the search `study` (--study), else that
    of the latest search in the MLflow store."""
    if given:
        return given, None
    return study_optuna_storage(tracking_uri, study)


def _program(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def mlflow_command(tracking_uri: str, host: str, port: int, *, workers: int = 1) -> list[str]:
    """`mlflow server` on the store, one worker (the UI needs no more on a laptop)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    root = artifact_root(tracking_uri)
    if root is not None:
        command += ["--default-artifact-root", root]
    return command


def optuna_dashboard_command(storage: str, host: str, port: int) -> list[str] | None:
    """optuna-dashboard on `storage`, or None when it is not installed."""
    program = _program("optuna-dashboard")
    if program is not None:
        return [program, storage, "--host", host, "--port", str(port)]
    if importlib.util.find_spec("optuna_dashboard") is not None:
        return [
            sys.executable,
            "-m",
            "optuna_dashboard",
            storage,
            "--host",
            host,
            "--port",
            str(port),
        ]
    return None


def _browse_host(host: str) -> str:
    """The host to put in a URL: a wildcard bind is reached on the loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


@dataclass
class Service:
    name: str
    url: str
    ready_url: str
    process: subprocess.Popen


def start(
    name: str, command: Sequence[str], url: str, ready_url: str, env: dict[str, str] | None = None
) -> Service:
    """Start `command` in its own process group (so that a stop reaches its workers too)."""
    process = subprocess.Popen(list(command), start_new_session=True, env=env)
    return Service(name, url, ready_url, process)


def server_env() -> dict[str, str]:
    """The servers' environment: MLflow's background job runner (GenAI evaluation jobs, a
    pool of worker processes) stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says
    otherwise: browsing runs does not need it."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def wait_until_up(service: Service, timeout_s: float) -> None:
    """Poll `service.ready_url` until it answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = service.process.poll()
        if code is not None:
            raise RuntimeError(f"{service.name} exited with status {code} while starting")
        try:
            with urllib.request.urlopen(service.ready_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{service.name} did not answer at {service.ready_url} in {timeout_s:.0f} s"
            )
        time.sleep(0.5)


def stop(services: Sequence[Service], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each service's process group, then SIGKILL what is left after `grace_s`."""
    for service in services:
        if service.process.poll() is None:
            _signal_group(service.process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for service in services:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(service.process, signal.SIGKILL)
            service.process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # the group leader is the process we started


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the project's MLflow store in the MLflow UI (and optuna-dashboard "
        "with --optuna) until Ctrl-C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the MLflow store (default: MLFLOW_TRACKING_URI or <CBTLAB_HOME>/mlflow.db)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="interface to bind; 0.0.0.0 exposes the UI to the network",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    parser.add_argument("--workers", type=int, default=1, help="MLflow server workers")
    parser.add_argument(
        "--optuna",
        action="store_true",
        help="also serve optuna-dashboard (if installed) on --optuna-storage",
    )
    parser.add_argument(
        "--optuna-storage",
        default=None,
        help="an Optuna RDB storage URL (default: the storage of the --study search, else that "
        "of the latest search in the MLflow store)",
    )
    parser.add_argument(
        "--study",
        default=None,
        help="serve the Optuna storage of this study's latest search (its parent run's "
        "study.optuna_storage)",
    )
    parser.add_argument(
        "--optuna-port", type=int, default=DEFAULT_OPTUNA_PORT, help="0: any free port"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the servers to answer",
    )
    return parser


Plan = tuple[str, list[str], str, str]  # (name, command, address, readiness URL)


def serve_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line of `dashboards/serve.py`."""
    args = serve_parser(prog).parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    plans: list[Plan] = []
    browse = _browse_host(args.host)
    mlflow_plan = _plan_mlflow_ui(args, uri, browse)
    if mlflow_plan is not None:
        plans.append(mlflow_plan)
    if args.optuna:
        optuna_plan = _plan_optuna_dashboard(args, uri, browse)
        if optuna_plan is not None:
            plans.append(optuna_plan)
    if not plans:
        return 0 if not args.optuna else 1
    return _run_services(plans, args, uri)


def _plan_mlflow_ui(args: argparse.Namespace, uri: str, browse: str) -> Plan | None:
    """The MLflow UI's server on a local store (none for a tracking server: it has its UI)."""
    if uri.startswith(("http://", "https://")):
        _say(f"the store {uri} is a tracking server: open it in a browser (its own UI)")
        return None
    db = local_sqlite(uri)
    if db is not None and not db.exists():
        _say(f"note: no store at {db} yet; the UI stays empty until a study logs to it")
        db.parent.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port(args.host if args.host != "::" else DEFAULT_HOST)
    url = f"http://{browse}:{port}"
    return (
        "MLflow UI",
        mlflow_command(uri, args.host, port, workers=args.workers),
        url,
        f"{url}/health",
    )


def _plan_optuna_dashboard(args: argparse.Namespace, uri: str, browse: str) -> Plan | None:
    """optuna-dashboard on the Optuna storage, when there is one and it is installed."""
    try:
        storage, name = optuna_storage(args.optuna_storage, args.study, uri)
    except (LookupError, MlflowException) as exc:
        _say(f"optuna-dashboard: no Optuna storage found ({exc}); pass --optuna-storage URL")
        return None
    db = local_sqlite(storage)
    if db is not None and not db.exists():
        _say(f"optuna-dashboard: no Optuna storage at {db}; pass --optuna-storage URL")
        return None
    _say(f"optuna-dashboard: {redact_url(storage)}" + (f", study {name}" if name else ""))
    port = args.optuna_port or free_port(args.host if args.host != "::" else DEFAULT_HOST)
    command = optuna_dashboard_command(storage, args.host, port)
    if command is None:
        _say(
            "optuna-dashboard is not installed (it is not a cbtlab dependency): "
            "`pip install optuna-dashboard` to serve the Optuna storage too"
        )
        return None
    url = f"http://{browse}:{port}"
    return ("optuna-dashboard", command, url, url)


def _run_services(plans: Sequence[Plan], args: argparse.Namespace, uri: str) -> int:
    """Start the planned servers, say where they are, and stop them all when one exits or on
    Ctrl-C / SIGTERM; the exit status."""
    say = _say
    services: list[Service] = []
    # Both signals stop the servers, even when SIGINT was ignored by whoever started us.
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, command, url, ready in plans:
            services.append(start(name, command, url, ready, env=server_env()))
        for service in services:
            wait_until_up(service, args.startup_timeout)
            say(f"{service.name}: {service.url}")
        _say_where(services, args.host, uri)
        while True:
            for service in services:
                code = service.process.poll()
                if code is not None:
                    say(f"{service.name} exited with status {code}; stopping")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except (RuntimeError, TimeoutError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        for sig in old:  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        stop(services)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if services:
            say("stopped")


def _say_where(services: Sequence[Service], host: str, uri: str) -> None:
    """The store and artifact root behind the UI, how far it is reachable, how to stop."""
    if services[0].name == "MLflow UI":
        _say(
            f"  store {uri}"
            + (
                f", artifacts of new experiments in {artifact_root(uri)}"
                if artifact_root(uri)
                else ""
            )
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        _say(f"  bound to {host}: reachable from other machines")
    _say("press Ctrl-C to stop")


def _say(text: str) -> None:
    print(text, flush=True)
