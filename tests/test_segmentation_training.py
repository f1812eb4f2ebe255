"""Segmentation training (cbtlab.train.segmentation, task.kind="segmentation"): a decoder
trained through the worker beats the majority-class baseline; the task section's config."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbtlab.analysis.segmentation import ConfusionMatrix
from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.data import open_split
from cbtlab.data.seg_transforms import SegEvalTransform, seg_loader
from cbtlab.tracking.schema import TRIAL_METRIC_PREFIXES, config_from_params
from cbtlab.train.segmentation import build_segmentation_model, poly_schedule, run_segmentation
from cbtlab.tune.cli import decoder_robustness_parser, seg_decoders_parser
from cbtlab.tune.definitions import SEG_SMOKE, decoder_robustness_spec, seg_decoders_spec
from cbtlab.tune.segmentation import noisy_mious, summarise


def _tiny_seg_config(tmp_path: Path, **overrides: object) -> ExperimentConfig:
    """The smoke preset's model and data (the study's own trials), a CBSA decoder of depth 1."""
    return ExperimentConfig().with_overrides(
        {
            **SEG_SMOKE,
            "task.decoder_attention": "cbsa",
            "task.decoder_depth": 1,
            "data.cache_dir": str(tmp_path),
            **overrides,
        }
    )


def test_a_cbsa_decoder_trains_past_the_majority_class(tmp_path: Path) -> None:
    cfg = _tiny_seg_config(tmp_path)
    reports: list[tuple[dict, dict | None]] = []
    run_segmentation(cfg, report=lambda m, s: reports.append((m, s)))
    final, state = reports[-1]
    assert state is not None and state["task_config"]["task.decoder_attention"] == "cbsa"
    # the baseline: every pixel the majority class (the background) on the same val images
    val = open_split(Path(tmp_path).glob("shapes-seg-*").__next__(), "val")
    baseline = ConfusionMatrix(4)
    for _, mask in seg_loader(val.urls, SegEvalTransform(42), batch_size=1, train=False):
        baseline.update(torch.zeros_like(mask), mask)
    assert final["val/miou"] > baseline.miou() + 0.15, (final["val/miou"], baseline.miou())
    assert final["val/pixel_acc"] > baseline.pixel_accuracy()
    assert reports[0][0]["train/loss"] > final["train/loss"]
    assert 0 < final["model/decoder_flops"] < final["model/flops"]
    assert "model/decoder_flops".startswith(TRIAL_METRIC_PREFIXES)  # MLflow gets it per trial
    # the robustness study's evaluation of the checkpoint: scale 0 is the clean model
    noisy = noisy_mious(cfg, state, [0.0, 3.0])
    assert noisy["noise/0/miou"] == pytest.approx(final["val/miou"], abs=1e-6)
    assert noisy["noise/3/miou"] < noisy["noise/0/miou"]


def test_evaluation_scores_at_the_original_resolution() -> None:
    """Logits of the resized image are resized back to the original mask before scoring: a
    model right at the half resolution scores 1 against the full-size mask, and a missed
    one-pixel stripe weighs its 16 pixels of 256 (a half-size mask would weigh it 8 of 64)."""
    from cbtlab.train.segmentation import evaluate_segmentation

    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 1
    transform = SegEvalTransform(8, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.fromarray(np.where(mask[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, 2))
    pixels, labels = transform(image, mask)
    assert pixels.shape == (3, 8, 8) and labels.shape == (16, 16)

    class Bright(torch.nn.Module):  # class 1 where the image is bright
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = (x.mean(1, keepdim=True) > 0.5).float()
            return torch.cat([1 - bright, bright], dim=1) * 10

    model = Bright()

    def score(batch: list) -> dict:
        return evaluate_segmentation(
            model, batch, num_classes=2, crop=8, stride=8, device=torch.device("cpu"),
            amp=contextlib.nullcontext,
        )  # fmt: skip

    assert score([(pixels[None], labels[None])])["val/miou"] == pytest.approx(1.0)
    striped = mask.copy()
    striped[:, 1] = 1  # one column of class 1 in the left half: half-size pixels miss it
    _, labels = transform(image, striped)
    metrics = score([(pixels[None], labels[None])])
    assert metrics["val/pixel_acc"] == pytest.approx(1 - 16 / 256)


def test_a_classification_config_holds_no_task_section() -> None:
    plain = ExperimentConfig().validate()
    assert not any(key.startswith("task.") for key in plain.flat())
    seg = plain.with_overrides({"task.kind": "segmentation", "task.decoder_depth": 3})
    assert seg.flat()["task.decoder_depth"] == 3
    assert ExperimentConfig.from_flat(seg.flat()).task.decoder_depth == 3
    # a run's logged params rebuild its config, the task section's included
    assert config_from_params({k: str(v) for k, v in seg.flat().items()}) == seg
    with pytest.raises(ConfigError, match=r"task\.decoder_attention"):
        seg.with_overrides({"task.decoder_attention": "nope"})
    with pytest.raises(ConfigError, match=r"train\.init_from.*task\.encoder_weights"):
        seg.with_overrides({"train.init_from": "/x"})
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        plain.with_overrides({"data.dataset": "shapes"})


def test_poly_schedule_warms_up_then_decays_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = poly_schedule(opt, warmup_steps=2, total_steps=10, power=1.0)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[-1] == pytest.approx(1 / 8) and opt.param_groups[0]["lr"] == 0


def test_seg_decoder_studies_specs() -> None:
    args = seg_decoders_parser().parse_args(["--decoders", "cbsa", "softmax", "--depths", "1", "2"])
    spec = seg_decoders_spec(args).validate()
    assert spec.metric == "val/miou" and spec.grid and spec.seeds == 2
    assert len(spec.cells) == 4 and spec.base.task.segmentation
    assert spec.base.data.dataset == "shapes"
    with pytest.raises(ConfigError, match="--decoders"):
        seg_decoders_spec(seg_decoders_parser().parse_args(["--decoders", "nope"]))
    with pytest.raises(ConfigError, match="--data-root"):
        seg_decoders_spec(seg_decoders_parser().parse_args(["--preset", "ade20k"]))
    ade = seg_decoders_spec(
        seg_decoders_parser().parse_args(["--preset", "ade20k", "--data-root", "/x"])
    )
    assert ade.base.model.num_classes == 150 and ade.base.task.encoder == "vit_tiny_patch16_224"
    robust = decoder_robustness_spec(decoder_robustness_parser().parse_args(["--depth", "2"]))
    assert robust.space == {
        "task.decoder_attention": ["cbsa", "mssa", "softmax"],
        "task.decoder_depth": [2],
    }


def test_robustness_summary_has_intervals_over_seeds() -> None:
    per_trial = [
        ("cbsa", {"noise/0/miou": 0.8, "noise/1/miou": 0.7}),
        ("cbsa", {"noise/0/miou": 0.6, "noise/1/miou": 0.5}),
        ("mssa", {"noise/0/miou": 0.7, "noise/1/miou": 0.2}),
    ]
    rows = summarise(per_trial, [0.0, 1.0])
    first = rows[0]
    assert (first["decoder"], first["scale"], first["seeds"]) == ("cbsa", 0.0, 2)
    assert first["miou"] == pytest.approx(0.7) and first["ci_low"] < 0.7 < first["ci_high"]
    assert rows[-1]["decoder"] == "mssa" and rows[-1]["seeds"] == 1


def test_robustness_keeps_the_studys_decoder_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trials come best first; the summary, its JSON and figure list the decoders in the
    study's order, each child run gets its noise metrics."""
    from cbtlab.tracking import StudyTracker
    from cbtlab.tracking.schema import CHECKPOINT_TAG
    from cbtlab.tune import segmentation

    def fake_noisy(cfg: ExperimentConfig, state: dict, scales: list, **_: object) -> dict:
        base = {"cbsa": 0.8, "mssa": 0.7, "softmax": 0.9}[cfg.task.decoder_attention]
        return {segmentation.noise_key(s): base - s / 10 - cfg.train.seed / 100 for s in scales}

    monkeypatch.setattr(segmentation, "noisy_mious", fake_noisy)
    monkeypatch.setattr(segmentation, "load_checkpoint", lambda location: {})
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "robust")
    parent = tracker.start_run("robust", params={}, tags={})
    rows = []
    for decoder, seed in [("softmax", 0), ("mssa", 1), ("cbsa", 0), ("softmax", 1),
                          ("cbsa", 1), ("mssa", 0)]:  # fmt: skip
        run_id = tracker.start_run("t", params={}, tags={CHECKPOINT_TAG: "/nowhere"},
                                   parent_run_id=parent)  # fmt: skip
        rows.append({"run_id": run_id, "status": "FINISHED", "train.seed": seed,
                     "task.decoder_attention": decoder})  # fmt: skip
    summary = segmentation.evaluate_robustness(
        ExperimentConfig().with_overrides(SEG_SMOKE), rows, keys=["task.decoder_attention"],
        scales=[0.0, 1.0], tracker=tracker, parent_run_id=parent,
        decoders=["cbsa", "mssa", "softmax"],
    )  # fmt: skip
    assert [(r["decoder"], r["scale"]) for r in summary] == [
        ("cbsa", 0.0), ("cbsa", 1.0), ("mssa", 0.0), ("mssa", 1.0),
        ("softmax", 0.0), ("softmax", 1.0),
    ]  # fmt: skip
    assert summary[0]["miou"] == pytest.approx(0.795) and summary[0]["seeds"] == 2
    logged = tracker.client.get_run(rows[0]["run_id"]).data.metrics
    assert logged["noise/1/miou"] == pytest.approx(0.8)
    names = {a.path for a in tracker.client.list_artifacts(parent)}
    assert {"noise_robustness.json", "noise_robustness.png"} <= names


@pytest.mark.parametrize("encoder", ["vit_tiny_patch16_224", "cbt_tiny_patch16_224"])
def test_a_timm_or_cbtlab_encoder_by_name(encoder: str) -> None:
    cfg = ExperimentConfig().with_overrides(
        {
            "task.kind": "segmentation",
            "task.encoder": encoder,
            "task.decoder_depth": 1,
            "model.in_chans": 3,
            "model.num_classes": 5,
            "model.img_size": 128,
            "model.patch_size": 16,
            "model.rep_grid": "2x2",
        }
    )
    model = build_segmentation_model(cfg)  # the zoo's CBT pools 8 x 8 representatives
    assert model(torch.randn(1, 3, 128, 160)).shape == (1, 5, 128, 160)
