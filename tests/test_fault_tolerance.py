"""Ray Train restarts a crashed worker group from its last checkpoint and ends exactly where an
uninterrupted run ends; a bad value raised in a worker fails the run at once, without restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbtlab.checkpoint import load_state
from cbtlab.config import ExperimentConfig
from cbtlab.train import build_trainer, fit
from cbtlab.train.faults import FailAt
from cbtlab.train.messages import DeterministicFailure

TINY = {"model.embed_dim": 24, "model.depth": 1, "model.rep_grid": "2x2", "train.epochs": 3}


def _fit(cfg: ExperimentConfig, name: str, storage: Path, fail_at: FailAt | None = None):
    return build_trainer(cfg, name=name, storage_path=str(storage), fail_at=fail_at).fit()


def _final_state(result) -> dict:
    with result.checkpoint.as_directory() as directory:
        return load_state(Path(directory))


@pytest.mark.ray
def test_a_crashed_worker_restarts_and_ends_identically(ray_session: None, tmp_path: Path) -> None:
    from ray.train import TrainingFailedError

    base = ExperimentConfig().with_overrides(TINY)
    crash = FailAt(epoch=1, step=3, rank=1)  # rank 1, step 3 of the second epoch
    straight = _fit(base, "straight", tmp_path)
    # The injected failure really fires: with no restarts allowed, the run fails.
    with pytest.raises(TrainingFailedError):
        _fit(base.with_overrides({"train.max_failures": 0}), "no_restart", tmp_path, crash)
    recovered = _fit(base, "recovered", tmp_path, crash)

    timing = ("time/", "throughput/")
    numbers = [
        {k: v for k, v in r.metrics.items() if k.startswith(("train/", "val/"))}
        for r in (straight, recovered)
    ]
    assert numbers[0] == numbers[1] and numbers[0]["val/samples"] == 360
    assert not any(k.startswith(timing) for k in numbers[0])
    a, b = _final_state(straight), _final_state(recovered)
    assert a["epochs_done"] == b["epochs_done"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.ray
def test_a_crash_after_a_mid_epoch_checkpoint_resumes_mid_epoch(
    ray_session: None, tmp_path: Path
) -> None:
    # No checkpoint at the end of the first epoch (checkpoint_every=2), one every 5 optimiser
    # steps: the crash at step 8 of the second epoch comes after a mid-epoch checkpoint in that
    # epoch, the only kind there is before it. (Starting over from scratch cannot succeed: the
    # injected failure fires in every run not started from a checkpoint.) Random augmentation
    # runs in the training processes, so the restored random state matters.
    base = ExperimentConfig().with_overrides(
        {
            **TINY,
            "train.epochs": 2,
            "train.checkpoint_every": 2,
            "train.checkpoint_every_steps": 5,
            "data.augment": "digits",
        }
    )
    straight = _fit(base, "straight_mid", tmp_path)
    recovered = _fit(base, "mid", tmp_path, FailAt(epoch=1, step=8, rank=1))
    numbers = [
        {k: v for k, v in r.metrics.items() if k.startswith(("train/", "val/"))}
        for r in (straight, recovered)
    ]
    assert numbers[0] == numbers[1] and numbers[0]["val/samples"] == 360
    a, b = _final_state(straight), _final_state(recovered)
    assert a["epochs_done"] == b["epochs_done"] == 2 and a["position"] is None
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.ray
def test_a_bad_value_in_a_worker_is_not_retried(ray_session: None, tmp_path: Path) -> None:
    """A ValueError (as the optimiser raises on a NaN rate) would be raised again by every
    restart: one attempt, then the run fails naming the rank and the error. Ray Train alone
    would have run it 1 + max_failures = 3 times."""
    cfg = ExperimentConfig().with_overrides({**TINY, "train.epochs": 1, "train.max_failures": 2})
    fired = tmp_path / "fired"
    fired.mkdir()
    bad = FailAt(epoch=0, step=0, rank=1, error=ValueError, record=str(fired))
    trainer = build_trainer(cfg, name="bad_value", storage_path=str(tmp_path), fail_at=bad)
    with pytest.raises(DeterministicFailure) as failure:
        fit(trainer)
    assert len(list(fired.iterdir())) == 1
    assert str(failure.value).startswith(
        "rank 1 raised ValueError: injected failure at epoch 0, step 0, rank 1"
    )


@pytest.mark.ray
def test_a_killed_worker_is_still_retried(ray_session: None, tmp_path: Path) -> None:
    """A worker whose process dies (no Python error at all) is a crash: Ray Train restarts the
    group from a checkpoint, and the run ends. It dies as the third epoch starts: a dead
    worker's report still in flight is lost with it, so the first epoch's checkpoint, reported
    an epoch earlier, is the one sure to be there."""
    cfg = ExperimentConfig().with_overrides(TINY)
    fired = tmp_path / "fired"
    fired.mkdir()
    kill = FailAt(epoch=2, step=0, rank=1, kill=True, record=str(fired))
    result = fit(build_trainer(cfg, name="killed", storage_path=str(tmp_path), fail_at=kill))
    assert len(list(fired.iterdir())) == 1  # the restart began after the failure point
    assert _final_state(result)["epochs_done"] == 3
