"""A study's best trial as a registered MLflow model (`cbtlab.tune.best_model`): logged with a
signature and an input example, registered under the study's name in a SQLite store and on a
tracking server, and loaded back (`mlflow.pytorch`, `mlflow.pyfunc`) with the checkpoint's own
logits; and a finished grid study registers its best cell's best seed (its trial runs with
MLflow's system metrics)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cbtlab.analysis.interpretability import load_model, read_checkpoint
from cbtlab.checkpoint import make_state, save_state
from cbtlab.config import ExperimentConfig
from cbtlab.models import build_model
from cbtlab.tracking import StudyTracker
from cbtlab.tracking.schema import (
    BEST_CELL_TAG,
    BEST_MODEL_TAG,
    CELL_TAG,
    CHECKPOINT_TAG,
    MODEL_CHECKPOINT_TAG,
    MODEL_EPOCH_TAG,
    MODEL_TRIAL_RUN_TAG,
    PARENT_TAG,
    ROLE_STUDY,
    ROLE_TAG,
    config_from_params,
    run_params,
)
from cbtlab.tune.best_model import log_best_model, tracking_uri
from conftest import FinishedStudy

TINY = {"model.depth": 1, "model.embed_dim": 24}


def _checkpoint(folder: Path) -> tuple[ExperimentConfig, Path]:
    """A checkpoint (cbtlab's format, after 3 epochs) of a tiny model whose weights no freshly
    built model has: its initial weights moved by noise."""
    cfg = ExperimentConfig().with_overrides(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    channels = cfg.model.in_chans
    state = make_state(
        cfg,
        epoch=3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        metrics={},
        normalisation=([0.5] * channels, [0.25] * channels),
    )
    return cfg, save_state(state, folder).parent


def _images(cfg: ExperimentConfig) -> torch.Tensor:
    side = cfg.model.img_size
    generator = torch.Generator().manual_seed(1)
    return torch.randn(5, cfg.model.in_chans, side, side, generator=generator)


def _check_reloads(uri: str, model_uri: str, checkpoint: str, cfg: ExperimentConfig) -> None:
    """The registered model, loaded by MLflow's pytorch and pyfunc flavours, gives the
    checkpoint's logits exactly."""
    images = _images(cfg)
    with torch.no_grad():
        expected = load_model(cfg, read_checkpoint(checkpoint)[0])(images)
    with tracking_uri(uri):
        torch_model = mlflow.pytorch.load_model(model_uri)
        pyfunc_model = mlflow.pyfunc.load_model(model_uri)
        info = mlflow.models.get_model_info(model_uri)
    with torch.no_grad():
        assert torch.equal(torch_model(images), expected)
    assert np.array_equal(pyfunc_model.predict(images.numpy()), expected.numpy())
    side = cfg.model.img_size
    [spec] = info.signature.inputs.inputs
    assert spec.shape == (-1, cfg.model.in_chans, side, side) and spec.type == np.float32
    assert info.signature.outputs.inputs[0].shape == (-1, cfg.model.num_classes)
    assert info.saved_input_example_info is not None


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_the_best_model_is_registered_and_reloads_with_the_checkpoints_logits(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if store == "server":  # the cluster's: PostgreSQL, basic auth, artifacts proxied to S3
        ml = request.getfixturevalue("cluster_services").mlflow
        uri = ml.uri
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ml.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ml.password)
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"best_{store}_{tmp_path.name}"
    cfg, folder = _checkpoint(tmp_path / "trial" / "checkpoint_000002")
    tracker = StudyTracker(uri, name)
    parent = tracker.start_run(name, params={}, tags={ROLE_TAG: ROLE_STUDY})
    trial = tracker.start_run(
        "trial_0", params=run_params(cfg), tags={CHECKPOINT_TAG: str(folder)}, parent_run_id=parent
    )

    best = log_best_model(uri, parent, trial, name=name)
    assert (best.uri, best.version, best.epoch) == (f"models:/{name}/1", "1", 3)
    client = MlflowClient(uri)
    assert client.get_run(parent).data.tags[BEST_MODEL_TAG] == best.uri
    version = client.get_model_version(name, "1")
    assert version.tags[MODEL_TRIAL_RUN_TAG] == trial and version.tags[MODEL_EPOCH_TAG] == "3"
    assert version.tags[MODEL_CHECKPOINT_TAG] == str(folder)
    assert client.get_logged_model(best.model_id).source_run_id == parent
    _check_reloads(uri, best.uri, str(folder), cfg)
    assert mlflow.get_tracking_uri() != uri  # the process-wide setting is put back


@pytest.mark.ray
def test_a_finished_grid_registers_its_best_cells_best_seed(
    tiny_variant_study: FinishedStudy,
) -> None:
    uri, name = tiny_variant_study.uri, tiny_variant_study.name
    assert tiny_variant_study.code == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    [parent] = client.search_runs([experiment.experiment_id], "tags.`cbtlab.role` = 'study'")
    model_uri = parent.data.tags[BEST_MODEL_TAG]
    assert f"is registered as {model_uri}" in tiny_variant_study.out
    version = client.get_model_version(name, model_uri.rsplit("/", 1)[1])
    best = client.get_run(version.tags[MODEL_TRIAL_RUN_TAG])
    assert best.data.tags[PARENT_TAG] == parent.info.run_id
    cell = best.data.tags[CELL_TAG]
    assert cell == parent.data.tags[BEST_CELL_TAG]
    with tempfile.TemporaryDirectory() as tmp:
        answer = json.loads(
            Path(client.download_artifacts(parent.info.run_id, "answer.json", tmp)).read_text()
        )
    budget = answer["budget_epoch"]
    seeds = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{CELL_TAG}` = '{cell}'",
    )
    at_budget = {
        run.info.run_id: next(
            m.value for m in client.get_metric_history(run.info.run_id, "val/top1")
            if m.step == budget
        )
        for run in seeds
    }  # fmt: skip
    assert at_budget[best.info.run_id] == max(at_budget.values())
    assert version.tags[MODEL_EPOCH_TAG] == str(budget)
    # The trial runs carry MLflow's system metrics, sampled while they were open.
    assert "system/cpu_utilization_percentage" in best.data.metrics
    cfg = config_from_params(best.data.params)
    _check_reloads(uri, model_uri, version.tags[MODEL_CHECKPOINT_TAG], cfg)
