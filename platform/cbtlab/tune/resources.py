"""How a study's trials fit on a Ray cluster: each trial's CPUs and GPUs, and how many run at
once (`plan_resources`, from the resources Ray reports; no Ray call here)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cbtlab.cluster import resolve_use_gpu, size_from_node
from cbtlab.config import ExperimentConfig
from cbtlab.tune.spec import StudySpec


@dataclass
class ResourcePlan:
    """How a study's trials fit on the cluster."""

    base: ExperimentConfig  # the study's base config with the trial scaling applied
    max_concurrent: int
    trial_cpus: float
    trial_gpus: int
    fits: int  # trials the whole cluster holds at once
    summary: str


def plan_resources(
    spec: StudySpec,
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> ResourcePlan:
    """Size the trials for `cluster` (as `ray.cluster_resources()` reports it) and its `nodes`
    (each node's resources, as `ray.nodes()` lists them; None: the cluster is one node).

    A GPU per worker as train.use_gpu says (set by `spec.gpus_per_worker`), its "auto" resolved
    by `cbtlab.cluster.resolve_use_gpu`: where the cluster has a GPU. On GPUs, the keys of
    `spec.node_sized` are sized for the GPU node (`cbtlab.cluster.size_from_node`).
    `max_concurrent` (unless given): as many trials as the cluster's CPUs and GPUs hold (at
    least 1; more wait for resources), for a grid and a search alike."""
    base = resolve_use_gpu(spec.base, cluster)
    base, sized = size_from_node(
        base,
        [cluster] if nodes is None else nodes,
        spec.node_sized,
        driver_cpus=spec.trial_driver_cpus,
    )
    train = base.train
    trial_cpus = spec.trial_driver_cpus + train.num_workers * train.cpus_per_worker
    trial_gpus = train.num_workers if train.use_gpu else 0
    fits = trials_that_fit(cluster, trial_cpus, trial_gpus)
    concurrent = spec.max_concurrent if spec.max_concurrent is not None else max(1, fits)
    worker = f"{train.cpus_per_worker:g} CPU" + (", 1 GPU" if train.use_gpu else "")
    summary = (
        f"each trial: {train.num_workers} workers x ({worker}) + {spec.trial_driver_cpus:g} CPU "
        f"for its driver; the cluster ({cluster.get('CPU', 0):g} CPU, "
        f"{cluster.get('GPU', 0):g} GPU) holds {fits} at once; running {concurrent} at once"
    )
    if sized:
        summary += f"; {sized}"
    if fits < 1:
        summary += " (a trial needs more than the cluster has now: it waits for resources)"
    return ResourcePlan(base, concurrent, trial_cpus, trial_gpus, fits, summary)


def trials_that_fit(cluster: Mapping[str, float], trial_cpus: float, trial_gpus: int) -> int:
    """How many trials of `trial_cpus` CPUs and `trial_gpus` GPUs `cluster` holds at once."""
    fits = math.floor(cluster.get("CPU", 0.0) / trial_cpus + 1e-9)
    if trial_gpus:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / trial_gpus + 1e-9))
    return fits
