"""A study's best trial as an MLflow model, registered in the model registry under the study's
name, so that `mlflow.pytorch.load_model("models:/<study>/<version>")` (or
`mlflow.pyfunc.load_model`) gives the trained network without Ray's storage.

The best trial is the study's answer (`cbtlab.tune.budget.Answer`): a search's ASHA pick, else
its best trial at the budget; a grid's best cell's best seed at the budget. Its weights are its
latest checkpoint (the run's `cbtlab.checkpoint` tag, read as the probes read it), the model
rebuilt from the run's params. The model is logged with `mlflow.pytorch.log_model` on the
study's parent run (linked to it as the run's output; its source run), with a signature and an
input example of the model's input shape (two images of `model.in_chans` x `model.img_size`
squared, zeros), and registered (`registered_model_name`) in one step: the registry is the
tracking store's own, a SQLite file or a tracking server alike. The version carries tags naming
the trial run, the checkpoint and its epoch; the parent run gets the tag `cbtlab.best_model`
(`models:/<study>/<version>`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from cbtlab.analysis.interpretability import load_model, locate_checkpoint, read_checkpoint
from cbtlab.config import ExperimentConfig
from cbtlab.tracking.schema import (
    BEST_MODEL_TAG,
    MODEL_CHECKPOINT_TAG,
    MODEL_EPOCH_TAG,
    MODEL_TRIAL_RUN_TAG,
    config_from_params,
)
from cbtlab.train.segmentation import build_segmentation_model
from cbtlab.tune.budget import Answer
from cbtlab.tune.stats import cell_label

MODEL_NAME = "model"  # the logged model's name on the parent run
EXAMPLE_IMAGES = 2
# What serving the model needs (MLflow would otherwise infer it by loading the model anew).
REQUIREMENTS = ("torch", "timm", "cbtlab")


@dataclass
class BestModel:
    """The registered model of a study's best trial."""

    uri: str  # models:/<name>/<version>
    name: str
    version: str
    model_id: str  # MLflow's logged model
    trial_run_id: str
    checkpoint: str
    epoch: int


def best_trial_row(
    answer: Answer, rows: Sequence[Mapping[str, Any]], space: Sequence[str], mode: str
) -> Mapping[str, Any] | None:
    """The summary row of the answer's trial (see the module docstring); None without one."""
    if not answer.grid:
        return answer.pick_row or answer.best_row
    if not answer.cells:
        return None
    best = answer.cells[0].label
    seeds = [
        r
        for r in rows
        if r.get("at_budget") is not None and cell_label({k: r[k] for k in space}) == best
    ]
    if not seeds:
        return None
    pick = max if mode == "max" else min
    return pick(seeds, key=lambda r: r["at_budget"])


def input_example(cfg: ExperimentConfig) -> np.ndarray:
    """A small batch of the model's input shape: (2, in_chans, img_size, img_size) zeros."""
    side = cfg.model.img_size
    return np.zeros((EXAMPLE_IMAGES, cfg.model.in_chans, side, side), dtype=np.float32)


def requirements() -> list[str]:
    """The pinned packages the logged model needs (those installed here)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) on `uri`, then as it was: it reads the
    store from a process-wide setting, which it also copies to MLFLOW_TRACKING_URI."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    before = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_registered_model(
    uri: str,
    run_id: str,
    model: torch.nn.Module,
    example: np.ndarray,
    *,
    name: str,
    tags: Mapping[str, str],
) -> tuple[str, str]:
    """Log `model` (eval mode, on the CPU) on the run `run_id` with the signature of `example`
    and its outputs, register it as a new version of `name`; (version, logged model id)."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    with tracking_uri(uri):
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            run_id=run_id,
            signature=infer_signature(example, logits),
            input_example=example,
            pip_requirements=requirements(),
            registered_model_name=name,
            tags=dict(tags),
        )
    registered = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, registered, key, value)
    return registered, info.model_id


def _trained_model(cfg: ExperimentConfig, state: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's network: the classifier, or a segmentation run's encoder + decoder."""
    if not cfg.task.segmentation:
        return load_model(cfg, state)
    model = build_segmentation_model(cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def log_best_model(
    uri: str,
    parent_run_id: str,
    trial_run_id: str,
    *,
    name: str,
    storage_path: str | None = None,
) -> BestModel:
    """Log the trial run's latest checkpoint as an MLflow model on the parent run and register
    it under `name` (see the module docstring). `storage_path`: the study's, where a run
    without a checkpoint tag has its training folder."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(trial_run_id)
    cfg = config_from_params(run.data.params)
    state, checkpoint = read_checkpoint(locate_checkpoint(run.data.tags, storage_path=storage_path))
    epoch = int(state.get("epochs_done", 0))
    tags = {
        MODEL_TRIAL_RUN_TAG: trial_run_id,
        MODEL_CHECKPOINT_TAG: checkpoint,
        MODEL_EPOCH_TAG: str(epoch),
    }
    registered, model_id = log_registered_model(
        uri, parent_run_id, _trained_model(cfg, state), input_example(cfg), name=name, tags=tags
    )
    model_uri = f"models:/{name}/{registered}"
    client.set_tag(parent_run_id, BEST_MODEL_TAG, model_uri)
    return BestModel(model_uri, name, registered, model_id, trial_run_id, checkpoint, epoch)
