"""The training worker loop, run without Ray (one rank)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbtlab.attention import ATTENTION_REGISTRY
from cbtlab.checkpoint import CheckpointError, load_state, save_state
from cbtlab.config import ExperimentConfig
from cbtlab.train import run_training

TINY = {
    "model.embed_dim": 24,
    "model.depth": 1,
    "model.num_heads": 3,
    "model.rep_grid": "2x2",
    "train.epochs": 2,
    "train.num_workers": 1,
    "data.batch_size": 128,
}


def _run(overrides: dict, resume: dict | None = None) -> list[dict[str, float]]:
    reports: list[dict[str, float]] = []
    cfg = ExperimentConfig().with_overrides({**TINY, **overrides})
    run_training(cfg, report=lambda metrics, state: reports.append(metrics), resume=resume)
    return reports


def _numbers(reports: list[dict[str, float]]) -> list[dict[str, float]]:
    timing = ("time/", "throughput/", "perf/")
    return [{k: v for k, v in r.items() if not k.startswith(timing)} for r in reports]


def test_reports_every_epoch_with_finite_metrics(digits_root: Path) -> None:
    reports = _run({})
    assert [r["epoch"] for r in reports] == [1, 2]
    for r in reports:
        assert r["val/samples"] == 360
        for key in ("train/loss", "val/loss", "val/top1", "val/top5", "throughput/train_img_s"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["val/top1"] <= r["val/top5"] <= 1
    assert reports[1]["train/loss"] < reports[0]["train/loss"]
    for r in reports:  # one rank: the total is the per-worker rate
        assert 0 <= r["train/top1"] <= r["train/top5"] <= 1
        assert r["perf/images_per_s"] == r["perf/images_per_s_per_worker"] > 0
        assert 0 < r["perf/data_wait_fraction"] < 1
        assert r["perf/peak_mem_mb"] > 10  # this process's peak RSS: torch alone is more


def test_same_seed_same_numbers_other_seed_other_numbers(digits_root: Path) -> None:
    first, again, other = _run({}), _run({}), _run({"train.seed": 1})
    assert _numbers(first) == _numbers(again)
    assert _numbers(first) != _numbers(other)


def test_resuming_from_a_checkpoint_continues_exactly(digits_root: Path, tmp_path: Path) -> None:
    cfg = ExperimentConfig().with_overrides({**TINY, "train.epochs": 3})
    states: list[dict] = []
    straight: list[dict[str, float]] = []
    final = run_training(cfg, report=lambda m, s: (straight.append(m), states.append(s)))
    assert all(s is not None for s in states)  # checkpoint_every = 1
    save_state(states[0], tmp_path / "ckpt")  # through the disk format, weights_only loading
    resumed: list[tuple[dict[str, float], dict | None]] = []
    again = run_training(
        cfg, report=lambda m, s: resumed.append((m, s)), resume=load_state(tmp_path / "ckpt")
    )
    # First the checkpoint's own epoch again (its report may have been lost with the run's
    # driver), as it was and without a new checkpoint; then the epochs after it.
    assert [r["epoch"] for r, _ in resumed] == [1, 2, 3]
    assert resumed[0] == (straight[0], None)
    assert _numbers([r for r, _ in resumed[1:]]) == _numbers(straight[1:])
    for (name, a), b in zip(final.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # A restart from the last epoch's checkpoint trains nothing and reports every epoch again:
    # a run whose trial driver died with a node trains on, and Tune may have none of its
    # epochs after the one it last received (seen on the two-node drill: epochs 2 and 3).
    ended: list[tuple[dict[str, float], dict | None]] = []
    run_training(cfg, report=lambda m, s: ended.append((m, s)), resume=states[-1])
    assert ended == [(m, None) for m in straight]
    # A checkpoint made before the history was recorded reports its own epoch only.
    older = {k: v for k, v in states[1].items() if k != "history"}
    ended.clear()
    run_training(cfg, report=lambda m, s: ended.append((m, s)), resume=older)
    assert [m["epoch"] for m, _ in ended] == [2, 3] and ended[0] == (straight[1], None)


def test_an_incompatible_checkpoint_is_refused(digits_root: Path, tmp_path: Path) -> None:
    states: list[dict] = []
    cfg = ExperimentConfig().with_overrides({**TINY, "train.epochs": 1})
    run_training(cfg, report=lambda m, s: states.append(s))
    with pytest.raises(CheckpointError, match=r"model\.depth=1"):
        _run({"model.depth": 2}, resume=states[0])
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state(tmp_path)


@pytest.mark.parametrize("attention", [*sorted(ATTENTION_REGISTRY), "mssa,cbsa"])
def test_every_attention_trains_on_the_digits(digits_root: Path, attention: str) -> None:
    reports = _run({"model.attention": attention, "model.depth": 2, "train.epochs": 1})
    assert math.isfinite(reports[0]["train/loss"]) and reports[0]["val/samples"] == 360


def test_compression_is_logged_at_the_chosen_epochs(digits_root: Path) -> None:
    reports = _run({"train.epochs": 2, "train.probe_every": 2, "train.probe_samples": 16})
    assert not any(k.startswith("rc") for k in reports[0])
    keys = {k for k in reports[1] if k.startswith(("rc/", "rc_norm/"))}
    assert keys == {"rc/layer_00", "rc_norm/layer_00"}  # TINY has one layer
    assert all(math.isfinite(reports[1][k]) and reports[1][k] > 0 for k in keys)


def test_divergence_stops_at_once(digits_root: Path) -> None:
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        _run({"train.lr": 1e30, "train.grad_clip": 0, "train.warmup_epochs": 0})


def test_cpu_threads_follow_the_config(digits_root: Path) -> None:
    before = torch.get_num_threads()
    try:
        _run({"train.epochs": 1, "train.torch_threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lion_and_bf16_train_on_the_cpu(digits_root: Path) -> None:
    reports = _run(
        {"train.optimizer": "lion", "train.lr": 1e-3, "train.precision": "bf16", "train.epochs": 2}
    )
    assert all(math.isfinite(r["train/loss"]) for r in reports)
    assert reports[1]["train/loss"] < reports[0]["train/loss"]


def test_accumulated_half_batches_train_like_full_batches(digits_root: Path) -> None:
    # SGD, so that float32's other summation order stays a rounding-level difference (Adam's
    # normalisation would magnify it on parameters whose gradients are near zero).
    common = {"train.optimizer": "sgd", "train.lr": 0.05, "train.epochs": 1}
    models, reports = [], []
    for batch, accum in ((128, 1), (64, 2)):
        cfg = ExperimentConfig().with_overrides(
            {**TINY, **common, "data.batch_size": batch, "train.grad_accum_steps": accum}
        )
        models.append(run_training(cfg, report=lambda m, s: reports.append(m)))
    one, two = models
    assert reports[1]["train/loss"] == pytest.approx(reports[0]["train/loss"], rel=1e-5)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_reaches_the_loop(digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []

    def fake_compile(module: torch.nn.Module, device: torch.device, mode: str) -> torch.nn.Module:
        compiled.append(mode)
        return module

    monkeypatch.setattr("cbtlab.train.loop.compile_model", fake_compile)
    _run({"train.epochs": 1})
    assert compiled == []
    _run({"train.epochs": 1, "train.compile": True})
    _run({"train.epochs": 1, "train.compile": True, "train.compile_mode": "reduce-overhead"})
    assert compiled == ["default", "reduce-overhead"]


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_mid_epoch_checkpoint_continues_exactly(
    digits_root: Path, tmp_path: Path, loader_workers: int
) -> None:
    # Random augmentation and dropout: the random state matters after the skipped batches.
    cfg = ExperimentConfig().with_overrides(
        {
            **TINY,
            "data.batch_size": 64,
            "data.augment": "digits",
            "data.loader_workers": loader_workers,
            "model.drop_rate": 0.2,
            "train.checkpoint_every_steps": 7,
        }
    )
    straight: list[tuple[dict, dict | None]] = []
    final = run_training(cfg, report=lambda m, s: straight.append((m, s)))
    mid = [s for m, s in straight if m.get("checkpoint/mid_epoch")]
    epochs = [m for m, s in straight if not m.get("checkpoint/mid_epoch")]
    assert [m["epoch"] for m in epochs] == [1, 2] and len(mid) >= 2
    state = next(s for s in mid if s["epochs_done"] == 1)  # in the second epoch
    assert state["position"]["batches_done"] > 0
    save_state(state, tmp_path / "mid")
    resumed: list[dict[str, float]] = []
    again = run_training(
        cfg,
        report=lambda m, s: None if m.get("checkpoint/mid_epoch") else resumed.append(m),
        resume=load_state(tmp_path / "mid"),
    )
    # The finished first epoch again, as it was, then the second trained on from its middle.
    assert resumed[0] == epochs[0]
    assert _numbers(resumed) == _numbers(epochs)
    for (name, a), b in zip(final.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match=r"data\.batch_size=64"):
        run_training(
            cfg.with_overrides({"data.batch_size": 32}),
            report=lambda m, s: None,
            resume=load_state(tmp_path / "mid"),
        )


def test_data_that_cannot_train_is_refused_before_any_worker_starts(digits_root: Path) -> None:
    from cbtlab.train.loop import check_training_data

    cfg = ExperimentConfig()
    check_training_data(cfg, world_size=2)  # the defaults fit
    with pytest.raises(ValueError, match="fewer than one batch of 2048"):
        check_training_data(cfg.with_overrides({"data.batch_size": 4096}), world_size=2)
    with pytest.raises(ValueError, match="global batch 64 does not split over 3 ranks"):
        check_training_data(cfg, world_size=3)
    with pytest.raises(ValueError, match=r"set model\.in_chans=1"):
        check_training_data(cfg.with_overrides({"model.in_chans": 3}), world_size=2)
