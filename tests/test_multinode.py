"""A study across two Ray nodes with the services of a real cluster (docs/cluster.md), all on
127.0.0.1 and started by the tests: PostgreSQL (MLflow's runs and users, the Optuna study),
moto's S3 server (the dataset's shards, Ray results and checkpoints, MLflow's artifacts) and
MLflow's tracking server with basic auth.

The test builds a dataset into s3:// with build_shards.py, then a 4-trial search reads it and runs
its trials on both nodes at once; the second node's raylet is killed
while one of its trials trains; the study finishes on the head node. Then MLflow holds exactly
one parent and 4 children, each with its per-epoch history once per epoch, Optuna holds 4
complete trials, and no secret appears in what the study wrote or printed.

The nodes run with `--block` as children of this test and are stopped by signalling their
process groups (never `ray stop`, which would stop every Ray instance of this user).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from cbtlab.tracking.schema import EPOCHS_TAG
from services import free_port, stop

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
EPOCHS = 3
# A node is declared dead after a few missed health checks (Ray's default takes ~30 s).
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}


def _node(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --block` with ports of its own, in a process group of its own; and its
    raylet's port."""
    ports = [free_port() for _ in range(6)]
    flags = [
        "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
        "--dashboard-agent-listen-port", str(ports[2]),
        "--dashboard-agent-grpc-port", str(ports[3]),
        "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
    ]  # fmt: skip
    with log.open("w") as out:
        node = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args, *flags],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return node, ports[0]


def _wait_started(node: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"ray start timed out:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def _ray_list(kind: str, dashboard: str, env: dict[str, str], *filters: str) -> list[dict]:
    """What the State API lists of `kind` (those matching `filters`, "key=value"); [] when the
    call fails."""
    flags = [arg for f in filters for arg in ("--filter", f)]
    out = subprocess.run(
        [RAY, "list", kind, "--address", dashboard, "--format", "json", "--limit", "1000",
         "--timeout", "60", *flags],
        env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    text = out.stdout.strip()  # "No resource in the cluster" when there is none
    return json.loads(text) if out.returncode == 0 and text.startswith("[") else []


def _raylet_pid(port: int) -> int:
    """The pid of the raylet listening on `port`."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
    for line in out.stdout.splitlines()[1:]:
        pid, args = line.split(maxsplit=1)
        if args.split()[0].endswith("/raylet") and f"--node_manager_port={port} " in args:
            return int(pid)
    raylets = [line[:300] for line in out.stdout.splitlines() if "raylet" in line]
    raise LookupError(f"no raylet on port {port}:\n" + "\n".join(raylets))


@pytest.mark.ray
@pytest.mark.cluster
def test_a_study_survives_losing_a_node(
    cluster_services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = cluster_services
    gcs, dashboard = free_port(), free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    # Socket paths must stay short; each node has its own (docs/cluster.md, section 7).
    temp_dir = tempfile.mkdtemp(prefix="cbtray", dir="/tmp")
    second_dir = tempfile.mkdtemp(prefix="cbtray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    # The cluster's token (`ray get-auth-token --generate` on a real one), for every node, the
    # driver and the State API calls here.
    token = secrets.token_hex(32)
    env.update({**services.s3.env(), **HEALTH, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Ray Train's placement-group cleaner asks the State API whether a trial's controller died
    # with the node; without this address it looks for "the" Ray instance of the machine, and
    # the test session's own local Ray (ray_session) makes that ambiguous.
    env["RAY_API_SERVER_ADDRESS"] = dashboard_url
    head_log, second_log = tmp_path / "head.log", tmp_path / "second.log"
    head, _ = _node(
        ["--head", "--num-cpus", "2", "--port", str(gcs), "--temp-dir", temp_dir,
         "--include-dashboard", "true", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(free_port())],
        env, head_log,
    )  # fmt: skip
    second = driver = None
    try:
        _wait_started(head, head_log)
        second, second_port = _node(
            ["--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--temp-dir", second_dir],
            env,
            second_log,
        )
        _wait_started(second, second_log)
        nodes = {n["node_id"]: n for n in _ray_list("nodes", dashboard_url, env)}
        assert len(nodes) == 2, nodes
        head_id = next(i for i, n in nodes.items() if n.get("is_head_node"))
        second_id = next(i for i in nodes if i != head_id)

        shards = _build_shards_on_s3(services, env, tmp_path)
        driver, output = _start_study(services, env, gcs, shards, tmp_path)
        polls = _kill_second_node_mid_trial(
            second_port, driver, output, dashboard_url, env, second_id
        )
        driver.wait(timeout=900)
        text = output.read_text()
        assert driver.returncode == 0, text[-6000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        for node in (second, head):
            if node is not None:
                stop(node, timeout_s=60)
        for folder in (temp_dir, second_dir):
            shutil.rmtree(folder, ignore_errors=True)
    assert polls[-1:] == ["killed"], "the second node was never killed mid-trial:\n" + "\n".join(
        polls[-40:]
    )
    _check_the_study(services, text, tmp_path, token, monkeypatch)


def _build_shards_on_s3(services, env: dict[str, str], tmp_path: Path) -> str:
    """The first 400 of scikit-learn's digits as an ImageFolder of PNGs, built into s3:// by
    data_pipelines/build_shards.py as a user would; the shards' URL."""
    digits = load_digits()
    folder = tmp_path / "digits"
    for i, (pixels, label) in enumerate(zip(digits.images[:400], digits.target[:400], strict=True)):
        split = "val" if i % 5 == 0 else "train"
        path = folder / split / f"digit{label}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
    url = f"s3://{services.bucket}/digits"
    build = subprocess.run(
        [sys.executable, str(REPO / "data_pipelines" / "build_shards.py"), "--source",
         "imagefolder", "--input", str(folder), "--output", url, "--samples-per-shard", "64",
         "--local", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    return url


def _start_study(services, env: dict[str, str], gcs: int, shards: str, tmp_path: Path):
    """The study's driver on the head node: a 4-trial search on the shards at `shards`, 1
    worker of 1 CPU per trial (2 nodes x 2 CPUs hold 3 at once: the head 1 worker and trial
    drivers, the second node 2)."""
    pg, ml = services.postgres, services.mlflow
    driver_env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), *sys.path]),
        "MLFLOW_TRACKING_USERNAME": ml.username,
        "MLFLOW_TRACKING_PASSWORD": ml.password,
    }
    output = tmp_path / "driver.log"
    with output.open("w") as out:
        driver = subprocess.Popen(
            [
                sys.executable, str(REPO / "studies" / "rep_count_ablation.py"),
                "--address", f"127.0.0.1:{gcs}", "--name", "two_nodes",
                "--tracking-uri", ml.uri, "--storage-path", f"s3://{services.bucket}/ray",
                "--optuna-storage", pg.url("optuna"),  # its password leaves the URL
                "--num-samples", "4", "--grids", "2x2,4x4", "--epochs", str(EPOCHS),
                "--grace-period", str(EPOCHS), "--workers", "1",
                "--set", "data.dataset=shards", "--set", f"data.root={shards}",
                "--set", "data.augment=digits", "--set", "model.in_chans=3",
                "--set", "train.cpus_per_worker=1", "--set", "model.depth=1",
                "--set", "model.embed_dim=24", "--set", "train.max_failures=3",
            ],
            cwd=tmp_path, env=driver_env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return driver, output


def _kill_second_node_mid_trial(
    raylet_port: int, driver, output: Path, dashboard: str, env, second_id: str
) -> list[str]:
    """Once a trial has finished an epoch and a training worker runs on the second node, SIGKILL
    that node's raylet. Returns what each poll saw, the last line saying whether it killed."""
    polls: list[str] = []
    started = time.monotonic()
    while time.monotonic() < started + 600 and driver.poll() is None:
        actors = _ray_list("actors", dashboard, env, "state=ALIVE")
        workers = [a for a in actors if "TrainWorker" in (a.get("class_name") or "")]
        on_second = sum(a.get("node_id") == second_id for a in workers)
        trained = "epoch 1/" in output.read_text()
        polls.append(
            f"{time.monotonic() - started:.0f}s: {len(actors)} actors alive, "
            f"{len(workers)} train workers, {on_second} on the second node, epoch 1 "
            f"{'reported' if trained else 'not yet'}"
        )
        if on_second and trained:
            os.kill(_raylet_pid(raylet_port), 9)
            polls.append("killed")
            break
        time.sleep(1)
    return polls


def _check_the_study(services, text: str, tmp_path: Path, token: str, monkeypatch) -> None:
    ml, pg = services.mlflow, services.postgres
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ml.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ml.password)
    client = MlflowClient(ml.uri)
    experiment = client.get_experiment_by_name("two_nodes")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    histories = {}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("cbtlab.error", "")
        # --grace-period EPOCHS: no trial is stopped early, each has every epoch, once (a trial
        # restarted from a checkpoint reports every epoch the checkpoint finished again).
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/top1")]
        histories[child.info.run_name] = steps
        assert steps == list(range(1, EPOCHS + 1)), histories
        assert child.data.tags[EPOCHS_TAG] == str(EPOCHS), child.data.tags
        assert child.data.params["data.root"].startswith("s3://"), child.data.params
    study_name = parent.data.params["study.optuna_study"]
    study = optuna.load_study(study_name=study_name, storage=pg.url("optuna"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4

    # No secret in what the study wrote or printed: params, tags, artifacts, the console and
    # every object under its results folder (Tune's pickled searcher among them).
    written = [text]
    for run in runs:
        written += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for artifact in client.list_artifacts(parent.info.run_id):
        if not artifact.is_dir:
            written.append(
                Path(
                    client.download_artifacts(parent.info.run_id, artifact.path, str(tmp_path))
                ).read_text()
            )
    s3 = services.s3.client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=services.bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=services.bucket, Key=obj["Key"])["Body"].read()
            written.append(body.decode("latin-1"))
    for secret in [*services.secrets(), token]:
        assert not [w[:200] for w in written if secret in w], "a secret was written down"
