"""Training on CUDA: bf16, channels_last, checkpoint snapshots on the CPU, NCCL across two
processes, and the GPU check end to end. Marked `gpu`; skipped where no CUDA device is visible
(`pytest -m gpu` selects them on a GPU machine)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cbtlab.checkpoint import make_state
from cbtlab.config import ExperimentConfig
from cbtlab.models import build_model
from cbtlab.train.gpu_check import gpu_check_main, iter_tensors, ray_importable
from cbtlab.train.loop import run_training
from cbtlab.train.recipe import build_optimizer, warmup_cosine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible"),
]

SMALL = {"model.depth": 2, "train.epochs": 2, "train.num_workers": 1, "data.batch_size": 64}


def _train(
    overrides: dict[str, Any],
) -> tuple[list[dict[str, float]], list[dict[str, Any]], nn.Module]:
    """Train on cuda:0 (train.precision "auto": bf16 there); the epochs' metrics, the
    checkpoint states and the model."""
    cfg = ExperimentConfig().with_overrides({**SMALL, **overrides})
    reports: list[dict[str, float]] = []
    states: list[dict[str, Any]] = []

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        reports.append(metrics)
        if state is not None:
            states.append(state)

    model = run_training(cfg, report=report, device=torch.device("cuda", 0))
    return reports, states, model


def _finite_and_learning(reports: list[dict[str, float]]) -> None:
    for r in reports:
        for key, value in r.items():
            assert math.isfinite(value), (r["epoch"], key, value)
        assert r["val/samples"] == 360
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]


def test_bf16_on_cuda_is_finite_and_learns(digits_root: Path) -> None:
    reports, states, model = _train({})
    _finite_and_learning(reports)
    assert next(model.parameters()).device.type == "cuda"
    assert reports[-1]["perf/peak_mem_mb"] > 0  # CUDA's max allocated during the epoch
    # The states the loop reported are snapshots on the CPU, the live model stays on the GPU.
    assert len(states) == 2
    assert {t.device.type for state in states for t in iter_tensors(state)} == {"cpu"}


def test_channels_last_trains(digits_root: Path) -> None:
    reports, _, _ = _train({"train.channels_last": True})
    _finite_and_learning(reports)


def test_a_checkpoint_state_made_on_the_gpu_lives_on_the_cpu() -> None:
    cfg = ExperimentConfig().with_overrides(SMALL)
    model = build_model(cfg.model).cuda()
    optimizer = build_optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10, min_ratio=0.1)
    images = torch.randn(8, 1, 16, 16, device="cuda")
    labels = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()  # the optimiser's state (Adam's moments) exists now, on the GPU
    scheduler.step()
    state = make_state(
        cfg,
        epoch=1,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        metrics={},
        normalisation=([0.5], [0.25]),
    )
    tensors = list(iter_tensors(state))
    assert tensors and {t.device.type for t in tensors} == {"cpu"}
    assert state["optimizer"]["state"]  # the moments were snapshotted too
    for name, live in model.state_dict().items():
        assert live.device.type == "cuda"
        assert torch.equal(state["model"][name], live.cpu()), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_processes_train_under_nccl(digits_root: Path) -> None:
    out = io.StringIO()
    argv = ["--processes", "2", "--epochs", "2", "--min-top1", "0", "--no-ray"]
    code = gpu_check_main([*argv, "--data-root", str(digits_root)], out=out)
    output = out.getvalue()
    assert code == 0, output
    assert "PASS  nccl: run_training on 2 ranks" in output
    assert "PASS  nccl: ranks end with identical parameters" in output


def test_the_gpu_check_passes_on_one_gpu(digits_root: Path) -> None:
    """The whole check on cuda:0: NCCL with one rank and, where Ray is installed, Ray Train
    with one GPU worker."""
    out = io.StringIO()
    code = gpu_check_main(["--processes", "1", "--data-root", str(digits_root)], out=out)
    output = out.getvalue()
    assert code == 0, output
    for name in ("training loss falls", "run resumed from epoch 1 matches", "val/top1"):
        assert f"PASS  nccl: {name}" in output, name
        if not ray_importable():
            assert f"PASS  ray: {name}" in output, name
    assert output.splitlines()[-1].startswith("GPU check passed")
