"""Robustness of trained segmentation decoders to noise in their projection matrices (the
paper's Fig. 8 right).

After the decoder study's grid has trained (`decoder_robustness_spec`), every finished trial's
last checkpoint is evaluated again, unchanged, at each noise scale s: every decoder layer's
input projection W becomes `W + s * rms(W) * G`, G ~ N(0, 1) elementwise
(`cbtlab.analysis.segmentation.add_projection_noise`; one draw per trial and scale, seeded by
--noise-seed and the scale itself). No retraining per noise level. Each trial's child run gets
`noise/<s>/miou` and `noise/<s>/pixel_acc`; the parent run gets `noise_robustness.json` (per
decoder and scale: the mean and 95% t-interval over seeds) and `noise_robustness.png`.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cbtlab.analysis.segmentation import add_projection_noise
from cbtlab.checkpoint import load_state
from cbtlab.config import ExperimentConfig
from cbtlab.data.seg_transforms import SegEvalTransform, seg_loader
from cbtlab.data.transforms import image_stats
from cbtlab.tracking import StudyTracker
from cbtlab.tracking.schema import CHECKPOINT_TAG
from cbtlab.train.segmentation import (
    build_segmentation_model,
    evaluate_segmentation,
    open_segmentation_data,
)
from cbtlab.tune.stats import mean_ci

NOISE_SCALES = (0.0, 0.1, 0.2, 0.5, 1.0)
ROBUSTNESS_JSON = "noise_robustness.json"
ROBUSTNESS_FIGURE = "noise_robustness.png"


def noise_key(scale: float, what: str = "miou") -> str:
    return f"noise/{scale:g}/{what}"


def trial_config(
    base: ExperimentConfig, row: Mapping[str, Any], keys: Sequence[str]
) -> ExperimentConfig:
    """The config a trial of the study ran: the base with its cell and seed."""
    return base.with_overrides({key: row[key] for key in [*keys, "train.seed"]})


def load_checkpoint(location: str) -> dict[str, Any]:
    """A checkpoint state from a folder or a storage URI (through Ray's `Checkpoint`)."""
    if "://" not in location:
        return load_state(Path(location))
    import ray.train

    with ray.train.Checkpoint(location).as_directory() as directory:
        return load_state(Path(directory))


def noisy_mious(
    cfg: ExperimentConfig,
    state: Mapping[str, Any],
    scales: Sequence[float],
    *,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """`noise/<s>/miou` and `noise/<s>/pixel_acc` of the checkpoint's model on the validation
    split, for every scale (0: the clean model)."""
    device = device or torch.device("cpu")
    model = build_segmentation_model(cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    _, val_set = open_segmentation_data(cfg)
    _, mean, std = image_stats(val_set)
    crop = cfg.model.img_size
    transform = SegEvalTransform(cfg.task.eval_size(crop), mean=mean, std=std)
    out: dict[str, float] = {}
    for scale in scales:
        noisy = copy.deepcopy(model)
        # the draw depends on the seed and the scale, not on the other scales asked for
        generator = torch.Generator().manual_seed(seed * 1_000_003 + round(float(scale) * 1e6))
        add_projection_noise(noisy.decoder.attention_layers(), float(scale), generator)
        metrics = evaluate_segmentation(
            noisy,
            seg_loader(val_set.urls, transform, batch_size=1, train=False),
            num_classes=cfg.model.num_classes,
            crop=crop,
            stride=cfg.task.stride(crop),
            device=device,
            amp=_no_autocast,
        )
        out[noise_key(scale)] = metrics["val/miou"]
        out[noise_key(scale, "pixel_acc")] = metrics["val/pixel_acc"]
    return out


def _no_autocast() -> Any:
    import contextlib

    return contextlib.nullcontext()


def evaluate_robustness(
    base: ExperimentConfig,
    rows: Sequence[Mapping[str, Any]],
    *,
    keys: Sequence[str],
    scales: Sequence[float],
    tracker: StudyTracker,
    parent_run_id: str,
    seed: int = 0,
    decoders: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Evaluate every finished trial under noise (on the driver's GPU where it has one), log
    each child run's values and the parent's summary (JSON and figure); returns the summary
    rows (decoder, scale, mean, CI, seeds), the decoders in the order of `decoders` (the
    study's), any other after them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_trial = []
    for row in rows:
        if row.get("status") != "FINISHED":
            continue
        location = tracker.client.get_run(row["run_id"]).data.tags.get(CHECKPOINT_TAG)
        if not location:
            continue
        cfg = trial_config(base, row, keys)
        values = noisy_mious(cfg, load_checkpoint(location), scales, seed=seed, device=device)
        tracker.log_metrics(row["run_id"], values, step=cfg.train.epochs)
        per_trial.append((cfg.task.decoder_attention, values))
    rank = {name: i for i, name in enumerate(decoders)}
    per_trial.sort(key=lambda item: rank.get(item[0], len(rank)))  # stable: seeds keep order
    summary = summarise(per_trial, scales)
    tracker.log_text(parent_run_id, json.dumps(summary, indent=2), ROBUSTNESS_JSON)
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_robustness(summary, Path(tmp) / ROBUSTNESS_FIGURE)
        tracker.log_artifact(parent_run_id, path)
    return summary


def summarise(
    per_trial: Sequence[tuple[str, Mapping[str, float]]], scales: Sequence[float]
) -> list[dict[str, Any]]:
    """Per decoder and scale: the mean mIoU over seeds and its 95% t-interval."""
    out = []
    for decoder in dict.fromkeys(d for d, _ in per_trial):
        for scale in scales:
            values = [v[noise_key(scale)] for d, v in per_trial if d == decoder]
            mean, std, low, high = mean_ci(values)
            out.append(
                {"decoder": decoder, "scale": float(scale), "miou": mean, "std": std,
                 "ci_low": low, "ci_high": high, "seeds": len(values)}
            )  # fmt: skip
    return out


def plot_robustness(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """mIoU against the noise scale, one line per decoder, its 95% interval shaded within
    [0, 1], where mIoU lives (the t-interval of 2 seeds reaches far beyond it; the JSON keeps
    the interval as computed)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for decoder in dict.fromkeys(r["decoder"] for r in summary):
        mine = [r for r in summary if r["decoder"] == decoder]
        xs = [r["scale"] for r in mine]
        ax.plot(xs, [r["miou"] for r in mine], marker="o", label=decoder)
        if all(math.isfinite(r["ci_low"]) for r in mine):
            ax.fill_between(
                xs,
                [max(0.0, r["ci_low"]) for r in mine],
                [min(1.0, r["ci_high"]) for r in mine],
                alpha=0.2,
            )
    ax.set_xlabel("noise scale on the decoder's projections (x rms of W)")
    ax.set_ylabel("val mIoU")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("decoder robustness (mean, 95% CI over seeds)")
    ax.legend(title="decoder attention")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "NOISE_SCALES",
    "evaluate_robustness",
    "noisy_mious",
    "plot_robustness",
    "summarise",
]
