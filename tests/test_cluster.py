"""The cluster entry point end to end: `ray start --head` (its own ports and temp folder, the
dashboard on, token authentication as Ray 2.60 sets it up), then `ray job submit --working-dir
.` of a tiny study, which must land in MLflow. The head runs with `--block` as a child of this
test and is stopped by signalling it (never `ray stop`, which would stop every Ray instance of
this user on the machine, this session's own included); what is left of its process group is
killed by the group's id."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.ray
@pytest.mark.cluster
def test_ray_job_submit_runs_a_study_on_a_started_cluster(
    isolated_home: Path, tmp_path: Path
) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    # Unix socket paths under the temp folder must stay short.
    temp_dir = tempfile.mkdtemp(prefix="cbtray", dir="/tmp")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once on SIGTERM
    head_log = tmp_path / "head.log"
    with head_log.open("w") as out:
        head = subprocess.Popen(
            [
                ray_bin, "start", "--head", "--block", "--num-cpus", "2",
                "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp_dir,
                "--port", str(gcs), "--dashboard-port", str(dashboard),
                "--ray-client-server-port", str(client),
                "--dashboard-agent-listen-port", str(agent),
                "--dashboard-agent-grpc-port", str(agent_grpc),
                "--runtime-env-agent-port", str(runtime_env),
                "--metrics-export-port", str(metrics),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in head_log.read_text():
            assert head.poll() is None, "ray start failed:\n" + head_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "ray start timed out:\n" + head_log.read_text()
            time.sleep(1)

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        runtime = {"env_vars": {"PYTHONPATH": "platform", "CBTLAB_HOME": str(isolated_home)}}
        job = subprocess.run(
            [
                ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                "--working-dir", ".", "--runtime-env-json", json.dumps(runtime), "--",
                "python", "studies/rep_count_ablation.py", "--address", "auto",
                "--num-samples", "1", "--epochs", "1", "--grids", "2x2", "--workers", "1",
                "--set", "model.depth=1", "--set", "model.embed_dim=24", "--name", "job_study",
                "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        output = job.stdout + job.stderr
        assert job.returncode == 0, output[-5000:]
        assert "succeeded" in output and "best at epoch 1, the budget" in output
        # The job ran the uploaded working directory's platform/, this checkout's code.
        assert "go on with --resume" in output

        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name("job_study")
        runs = mlflow.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == 1
        assert parents[0].info.status == "FINISHED" and children[0].info.status == "FINISHED"
        assert children[0].data.params["model.depth"] == "1"
        assert children[0].data.tags["cbtlab.study"] == "job_study"
    finally:
        head.terminate()  # SIGTERM: ray start --block stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        with contextlib.suppress(ProcessLookupError):  # the head's group: what this test started
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_local_ray_tells_its_workers_where_the_state_api_is(ray_session: None) -> None:
    """Ray Train's placement-group cleaner (a worker) queries the State API; unless told where
    it is, another Ray instance on the machine makes that fail, and a finished trial's workers
    stay reserved (the next trial then waits forever)."""
    import ray

    @ray.remote(num_cpus=0)
    def state_api() -> tuple[str, int]:
        from ray.util.state import list_nodes

        return os.environ.get("RAY_API_SERVER_ADDRESS", ""), len(list_nodes())

    address, nodes = ray.get(state_api.remote())
    assert address.startswith("http://127.0.0.1:") and nodes == 1
