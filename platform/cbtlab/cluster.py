"""The driver's view of the cluster: the Ray connection (`connect_ray`, free ports), whether a run
trains on GPUs, and how a GPU node's CPUs are shared among its GPU workers.

`train.use_gpu` is "auto" by default; only a driver (`cbtlab train`, a study, a reproduction,
`build_trainer`) resolves it, with `resolve_use_gpu`, from what `ray.cluster_resources()`
reports, before it builds a TorchTrainer: the training workers only ever see true or false.
Only `connect_ray` and `node_resources` touch Ray (imported when called); the rest is pure
(plain dicts in, values out).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from cbtlab.config import AUTO, ExperimentConfig

# The config keys a driver may size from the GPU node (`gpu_worker_sizing`).
NODE_SIZED_KEYS = ("train.cpus_per_worker", "data.loader_workers")
# Loader processes per GPU worker at most: past this, decoding outruns one GPU's step on the
# zoo's models, and each process holds its own shuffle buffer.
MAX_LOADER_WORKERS = 16
# CPUs of a GPU node left to Ray and the trial drivers (at least this much).
RESERVED_CPUS = 1.0


def gpu_available(cluster: Mapping[str, float]) -> bool:
    """Whether `cluster` (as `ray.cluster_resources()` reports it) has a GPU."""
    return cluster.get("GPU", 0.0) >= 1


def use_gpu_on(value: bool | str, cluster: Mapping[str, float]) -> bool:
    """`train.use_gpu` resolved on `cluster`: "auto" is true where the cluster has a GPU;
    true and false stay as they are."""
    if value == AUTO:
        return gpu_available(cluster)
    if not isinstance(value, bool):
        raise ValueError(f"train.use_gpu: expected true, false or 'auto', got {value!r}")
    return value


def resolve_use_gpu(cfg: ExperimentConfig, cluster: Mapping[str, float]) -> ExperimentConfig:
    """`cfg` with `train.use_gpu` resolved on `cluster` (itself when already resolved)."""
    if cfg.train.use_gpu != AUTO:
        return cfg
    return cfg.with_overrides({"train.use_gpu": use_gpu_on(AUTO, cluster)})


def gpu_worker_sizing(
    node_cpus: float, node_gpus: float, *, reserved_cpus: float = RESERVED_CPUS
) -> tuple[float, int]:
    """(train.cpus_per_worker, data.loader_workers) of one GPU worker on a node of `node_cpus`
    CPUs and `node_gpus` GPUs: the node's CPUs but `reserved_cpus` (Ray, the trial drivers)
    shared equally among its GPUs, whole CPUs where there is at least one per GPU; of a
    worker's CPUs, one runs the training process and the others its loader processes (at most
    `MAX_LOADER_WORKERS`). A node with less than a CPU per GPU gives each a fraction and no
    loader process."""
    if node_gpus < 1:
        raise ValueError(f"a GPU node needs at least one GPU, got {node_gpus:g}")
    if node_cpus <= 0:
        raise ValueError(f"a GPU node needs CPUs, got {node_cpus:g}")
    share = (node_cpus - reserved_cpus) / node_gpus
    if share <= 0:  # no room for the reserve: the GPUs' workers share every CPU
        share = node_cpus / node_gpus
    if share >= 1:
        cpus = float(math.floor(share + 1e-9))
    else:
        cpus = max(0.01, math.floor(share * 100 + 1e-9) / 100)
    loader_workers = min(MAX_LOADER_WORKERS, max(0, int(cpus) - 1))
    return cpus, loader_workers


def gpu_node_shape(nodes: Sequence[Mapping[str, float]]) -> tuple[float, float] | None:
    """(CPUs, GPUs) of the GPU node with the fewest CPUs per GPU among `nodes` (each node's
    resources, as `ray.nodes()` lists them), so that a worker sized for it fits on every GPU
    node; None without a GPU node."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) >= 1]
    if not gpu_nodes:
        return None
    node = min(gpu_nodes, key=lambda n: n.get("CPU", 0.0) / n["GPU"])
    return node.get("CPU", 0.0), node["GPU"]


def size_from_node(
    cfg: ExperimentConfig,
    nodes: Sequence[Mapping[str, float]],
    keys: Sequence[str] = NODE_SIZED_KEYS,
    *,
    driver_cpus: float = 0.0,
) -> tuple[ExperimentConfig, str]:
    """`cfg` with `keys` (of `NODE_SIZED_KEYS`) sized by `gpu_worker_sizing` for the GPU node
    of `nodes`, and a line saying so; `cfg` unchanged ("" said) when it does not train on GPUs
    (resolve train.use_gpu first), when no key is asked for or no node has a GPU. The node keeps
    `RESERVED_CPUS`, or `driver_cpus` per GPU (a trial driver each) where that is more."""
    unknown = [key for key in keys if key not in NODE_SIZED_KEYS]
    if unknown:
        raise ValueError(f"cannot size {unknown} from the node; sized: {NODE_SIZED_KEYS}")
    shape = gpu_node_shape(nodes)
    if cfg.train.use_gpu is not True or not keys or shape is None:
        return cfg, ""
    reserved = max(RESERVED_CPUS, driver_cpus * shape[1])
    cpus, loader_workers = gpu_worker_sizing(*shape, reserved_cpus=reserved)
    sized = {"train.cpus_per_worker": cpus, "data.loader_workers": loader_workers}
    overrides = {key: sized[key] for key in keys}
    said = ", ".join(f"{key}={value:g}" for key, value in overrides.items())
    return cfg.with_overrides(overrides), (
        f"sized from the GPU node ({shape[0]:g} CPU, {shape[1]:g} GPU): {said}"
    )


def node_resources() -> list[dict[str, float]]:
    """The resources of every live node of the connected Ray cluster."""
    import ray

    nodes: list[Any] = ray.nodes()
    return [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a `host:port` (or `ray://host:port`) cluster address does not answer:
    `ray.init` would wait minutes for the GCS."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r} is not 'auto' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc


def connect_ray(address: str | None, *, worker_logs: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray on this machine.

    When cbtlab is imported from a source tree rather than installed (e.g. inside
    `ray job submit --working-dir .`), ship the package to the workers."""
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {}
    try:
        metadata.distribution("cbtlab")
    except metadata.PackageNotFoundError:
        runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=worker_logs)
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner needs the State API to
        # release a finished trial's workers' resources. Its client (in a worker) finds the API
        # server from RAY_API_SERVER_ADDRESS, else looks for *the* Ray instance on this machine
        # and fails when there are several (another user's, another study's): the trial's
        # workers then stay reserved and the next trial waits for them forever. So the
        # dashboard gets a port chosen here, and every worker is told where it is.
        port = free_port()
        env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        ray.init(
            runtime_env={**runtime_env, "env_vars": env_vars},
            log_to_driver=worker_logs,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it), for a server started right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
