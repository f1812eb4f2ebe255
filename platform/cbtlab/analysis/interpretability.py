"""Every interpretability probe on a finished run, logged to MLflow.

`probe_run` finds a run's checkpoint, rebuilds its model from the run's config and runs the
probes on validation images of its dataset (`run_probes`); the results go to a new MLflow run
nested under the probed one (`cbtlab.role=probe`), so that the trial's own per-epoch history
stays as training wrote it and a probe can be repeated with other settings side by side.

Metrics (step = the checkpoint's epochs done; layers and heads numbered from 0):
  rc/layer_XX, rc_norm/layer_XX     the compression term Rc of layer XX's output against its
                                    own subspaces, raw and with unit-norm tokens (Fig. 5);
                                    only layers with subspaces (not ViT's q, k, v)
  rcr_tokens/layer_XX/head_YY       R(W_k): coding rate of the N tokens entering CBSA layer XX,
                                    projected on head YY's subspace, W_k = LN(Z) U_k (Fig. 6)
  rcr_reps/layer_XX/head_YY         R(Q_k): coding rate of that head's m representatives after
                                    the extraction step (before the contraction)
  extraction_rank/layer_XX/head_YY  numerical rank of CBSA's A (m x N) (Appendix A)
  robustness/top1/scale_S           val top-1 with Gaussian noise of relative scale S in every
                                    attention projection (Fig. 8 right); scale_0 = clean
  seg/layer_XX/<kind>/head_YY|combined   zero-shot segmentation IoUs on PASCAL VOC, when a
                                    VOC folder is given (see `cbtlab.analysis.segmentation`)
All coding rates use `eps` (default 0.5) as `p / (n eps^2)` (CBSA_MATH.md), or the reference
code's `p / (n eps)` with `squared_eps=False`; R and Rc are means over the probe images.

Artifacts (under `probes/`): compression.png, coding_rates.png, attention_layer_XX.png (the
CLS token's map over the patches, per head, blended over the images), robustness.png and
probe_metrics.json (every metric above).

The checkpoint: `--checkpoint`, else the one the probed run records (`locate_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from torch import Tensor

from cbtlab.analysis.attention_maps import cls_attention_maps, denormalize, plot_attention_overlays
from cbtlab.analysis.probes import (
    HeadCodingRates,
    extraction_rank,
    head_coding_rates,
    layer_compression,
    noisy_attention_accuracy,
)
from cbtlab.analysis.segmentation import (
    SegmentationSettings,
    VOCSegmentation,
    zero_shot_segmentation,
)
from cbtlab.checkpoint import (
    STATE_FILE,
    CheckpointError,
    check_compatible,
    load_state,
    recorded_normalisation,
)
from cbtlab.config import ExperimentConfig
from cbtlab.data import eval_batches, open_split, prepare_dataset, transforms_for
from cbtlab.models import CBTransformer, build_model
from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.paths import cbtlab_home, default_tracking_uri, ray_results_home
from cbtlab.tracking import StudyTracker, git_state
from cbtlab.tracking.schema import (
    CHECKPOINT_TAG,
    CONFIG_HASH_TAG,
    PROBED_RUN_TAG,
    ROLE_PROBE,
    ROLE_TAG,
    STUDY_TAG,
    TAG_PREFIX,
    TRIAL_TAG,
    config_from_params,
)

ARTIFACT_DIR = "probes"
STANDALONE_EXPERIMENT = "interpretability_probe"


@dataclass
class ProbeSettings:
    samples: int = 64  # validation images for Rc, coding rates, ranks
    eps: float = 0.5
    squared_eps: bool = True
    rank_threshold: float = 1e-3
    noise_scales: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
    noise_seed: int = 0
    robustness_images: int = 1024  # the first this many validation images
    overlay_images: int = 6
    overlay_layers: tuple[int, ...] | None = None  # None: every layer with a map
    voc_root: str = ""  # a PASCAL VOC folder: also run zero-shot segmentation
    voc_split: str = "val"
    voc_images: int = 0  # 0: all of the split
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)

    def params(self) -> dict[str, Any]:
        """The settings as flat MLflow params (`probe.*`)."""
        flat = asdict(self)
        seg = flat.pop("segmentation")
        flat["noise_scales"] = ",".join(f"{s:g}" for s in self.noise_scales)
        flat["overlay_layers"] = (
            "all" if self.overlay_layers is None else ",".join(map(str, self.overlay_layers))
        )
        return {
            **{f"probe.{k}": v for k, v in flat.items()},
            **{f"probe.seg_{k}": v for k, v in seg.items()},
        }


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    figures: list[Path]
    rates: list[HeadCodingRates]


def _scale_name(scale: float) -> str:
    return f"scale_{scale:g}"


def coding_rate_metrics(rates: Sequence[HeadCodingRates]) -> dict[str, float]:
    metrics = {}
    for layer in rates:
        for name, values in (("rcr_tokens", layer.tokens), ("rcr_reps", layer.representatives)):
            for head, value in enumerate(values):
                metrics[f"{name}/layer_{layer.layer:02d}/head_{head:02d}"] = value
    return metrics


def validation_data(
    cfg: ExperimentConfig,
    *,
    max_images: int,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], list[float], list[float]]:
    """The first `max_images` validation images of the run's dataset in batches of the run's
    `data.batch_size`, with the evaluation transform normalising with `normalisation` (mean,
    std: the checkpoint's record; None: the dataset card's statistics), and the (mean, std)
    they were normalised with. (The one place that knows the data API.)"""
    val = open_split(prepare_dataset(cfg.data), "val")
    tf = transforms_for(cfg.data, cfg.model.img_size, val, normalisation)
    eval_tf, mean, std = tf.eval, tf.mean, tf.std
    batches, count = [], 0
    for images, labels in eval_batches(
        val, rank=0, world_size=1, batch_size=cfg.data.batch_size, transform=eval_tf
    ):
        keep = min(len(labels), max_images - count)
        batches.append((images[:keep], labels[:keep]))
        count += keep
        if count >= max_images:
            break
    return batches, list(mean), list(std)


def plot_compression(rc: Sequence[float], rc_norm: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, values, title in ((axes[0], rc, "Rc"), (axes[1], rc_norm, "Rc, unit-norm tokens")):
        ax.plot(range(len(values)), values, marker="o")
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_head_coding_rates(
    rates: Sequence[HeadCodingRates], path: Path, *, subtitle: str = ""
) -> None:
    """Fig. 6: per CBSA layer, R of the tokens and of the representatives, head by head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, len(rates)))
    rows = max(1, math.ceil(len(rates) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(rates) :]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, rates, strict=False):
        heads = range(len(layer.tokens))
        ax.bar([h - 0.2 for h in heads], layer.tokens, width=0.4, label="tokens R(W_k)")
        ax.bar([h + 0.2 for h in heads], layer.representatives, width=0.4, label="reps R(Q_k)")
        ax.set_xticks(list(heads))
        ax.set_xlabel("head")
        ax.set_ylabel("coding rate")
        ax.set_title(f"layer {layer.layer}")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"coding rates per head\n{subtitle}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.9))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_robustness(curve: dict[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    scales = sorted(curve)
    ax.plot(scales, [curve[s] for s in scales], marker="o")
    ax.set_xlabel("noise scale (x rms of the weights)")
    ax.set_ylabel("val top-1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_probes(
    model: CBTransformer,
    cfg: ExperimentConfig,
    out_dir: Path,
    settings: ProbeSettings | None = None,
    *,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> ProbeResult:
    """Run every probe on `model` (trained with `cfg`, its images normalised with
    `normalisation`: see `validation_data`); write the figures to `out_dir`."""
    settings = settings or ProbeSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    need = max(settings.samples, settings.robustness_images, settings.overlay_images)
    batches, mean, std = validation_data(cfg, max_images=need, normalisation=normalisation)
    few = max(settings.samples, settings.overlay_images)
    images = torch.cat([b[0] for b in _first_images(batches, few)])
    probe_images = images[: settings.samples]
    metrics: dict[str, float] = {}
    figures: list[Path] = []

    eps = {"squared_eps": settings.squared_eps}
    rc = layer_compression(model, probe_images, settings.eps, **eps)
    rc_norm = layer_compression(model, probe_images, settings.eps, normalize=True, **eps)
    for i, (raw, unit) in enumerate(zip(rc, rc_norm, strict=True)):
        if math.isfinite(raw):  # NaN: no subspaces in this layer
            metrics[f"rc/layer_{i:02d}"] = raw
            metrics[f"rc_norm/layer_{i:02d}"] = unit
    figures.append(out_dir / "compression.png")
    plot_compression(rc, rc_norm, figures[-1])

    rates = head_coding_rates(model, probe_images, settings.eps, **eps)
    metrics.update(coding_rate_metrics(rates))
    figures.append(out_dir / "coding_rates.png")
    convention = "eps^2" if settings.squared_eps else "eps"
    plot_head_coding_rates(
        rates, figures[-1], subtitle=f"eps = {settings.eps:g}, alpha = p / (n {convention})"
    )

    for i, heads in enumerate(
        extraction_rank(model, probe_images, rel_threshold=settings.rank_threshold)
    ):
        for h, rank in enumerate(heads):
            metrics[f"extraction_rank/layer_{i:02d}/head_{h:02d}"] = rank

    shown = images[: settings.overlay_images]
    maps = cls_attention_maps(model, shown)
    layers = settings.overlay_layers
    layers = range(len(maps)) if layers is None else [i % len(maps) for i in layers]
    pictures = denormalize(shown, mean, std)
    for i in layers:
        if maps[i] is None:
            continue
        figures.append(out_dir / f"attention_layer_{i:02d}.png")
        kind = type(model.blocks[i].attn).__name__
        title = f"layer {i} ({kind}): CLS attention over the patches"
        plot_attention_overlays(pictures, maps[i], figures[-1], title=title)

    robust = _first_images(batches, settings.robustness_images)
    curve = noisy_attention_accuracy(model, robust, settings.noise_scales, seed=settings.noise_seed)
    for scale, top1 in curve.items():
        metrics[f"robustness/top1/{_scale_name(scale)}"] = top1
    figures.append(out_dir / "robustness.png")
    plot_robustness(curve, figures[-1])

    if settings.voc_root:
        voc = VOCSegmentation(settings.voc_root, settings.voc_split)
        count = settings.voc_images or len(voc)
        samples = (voc[i] for i in range(min(count, len(voc))))
        inputs = {"img_size": cfg.model.img_size, "mean": mean, "std": std}
        metrics.update(
            zero_shot_segmentation(model, samples, settings=settings.segmentation, **inputs)
        )

    (out_dir / "probe_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return ProbeResult(metrics, figures, rates)


def _first_images(
    batches: Sequence[tuple[Tensor, Tensor]], limit: int
) -> list[tuple[Tensor, Tensor]]:
    out, count = [], 0
    for images, labels in batches:
        if count >= limit:
            break
        keep = min(len(labels), limit - count)
        out.append((images[:keep], labels[:keep]))
        count += keep
    return out


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """A cbtlab checkpoint state and where it was read from. `path` is the state file, a
    checkpoint folder (what Ray Train reports; also a URI such as s3://...), or a training
    run's folder holding `checkpoint_*` folders, of which the latest (by name: Ray names them
    by time) that holds a state is read."""
    text = str(path)
    if "://" in text:
        from ray.train import Checkpoint

        return load_state(Path(Checkpoint(text).to_directory())), text
    where = Path(text).expanduser()
    if where.is_file():
        where = where.parent
    if not (where / STATE_FILE).is_file():
        found = sorted(p for p in where.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if not found and not (where / "diverged.txt").is_file():
            raise CheckpointError(
                f"no checkpoint at {where}: expected {STATE_FILE}, or checkpoint_* folders "
                "holding one"
            )
        where = found[-1] if found else where
    return load_state(where), str(where)


def locate_checkpoint(tags: dict[str, str], *, storage_path: str | Path | None = None) -> str:
    """Where a run's checkpoint is: its `cbtlab.checkpoint` tag, else its trial's training
    folder `<storage_path>/trial_<cbtlab.trial_id>` (storage_path: the study's
    `--storage-path`, default `<CBTLAB_HOME>/ray_results`)."""
    if tags.get(CHECKPOINT_TAG):
        return tags[CHECKPOINT_TAG]
    trial = tags.get(TRIAL_TAG)
    if not trial:
        raise CheckpointError(
            f"the run records no checkpoint (no tag {CHECKPOINT_TAG} or {TRIAL_TAG}); "
            "pass --checkpoint PATH"
        )
    if storage_path is None:
        storage_path = ray_results_home()
    folder = Path(storage_path).expanduser() / f"trial_{trial}"
    if not folder.is_dir():
        raise CheckpointError(
            f"trial {trial}'s training folder {folder} does not exist; pass the study's "
            "--storage-path or --checkpoint PATH"
        )
    return str(folder)


def load_model(cfg: ExperimentConfig, state: dict[str, Any]) -> CBTransformer:
    """The model of `cfg` with the checkpoint's weights (refused if made with another model)."""
    check_compatible(state, cfg)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.eval()


@dataclass
class ProbeRun:
    run_id: str  # the new MLflow run holding the probes
    checkpoint: str
    out_dir: Path  # the figures and probe_metrics.json, as logged
    result: ProbeResult


def probe_run(
    tracking_uri: str,
    run_id: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    storage_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    settings: ProbeSettings | None = None,
    out_dir: Path | None = None,
) -> ProbeRun:
    """Probe the checkpoint of MLflow run `run_id` (or the one given) and log the results as
    a child run of it (without a run: a run of experiment `interpretability_probe`, the config
    from the checkpoint's model fields and `overrides`). The figures are also kept in
    `out_dir` (default `<CBTLAB_HOME>/probes/<run id>`)."""
    settings = settings or ProbeSettings()
    tags: dict[str, str] = {ROLE_TAG: ROLE_PROBE}
    if run_id is not None:
        client = MlflowClient(tracking_uri=tracking_uri)
        probed = client.get_run(run_id)
        experiment = client.get_experiment(probed.info.experiment_id).name
        cfg = config_from_params(probed.data.params).with_overrides(overrides or {})
        path = checkpoint or locate_checkpoint(probed.data.tags, storage_path=storage_path)
        name = f"probe-{probed.info.run_name or run_id[:8]}"
        tags[PROBED_RUN_TAG] = run_id
        if STUDY_TAG in probed.data.tags:
            tags[STUDY_TAG] = probed.data.tags[STUDY_TAG]
    elif checkpoint is not None:
        experiment, path, name = STANDALONE_EXPERIMENT, checkpoint, "probe"
        cfg = None
    else:
        raise ValueError("give a run id, a checkpoint, or both")
    state, where = read_checkpoint(path)
    if cfg is None:
        cfg = ExperimentConfig.from_flat({**state["model_config"], **(overrides or {})})
    model = load_model(cfg, state)

    if out_dir is None:
        out_dir = cbtlab_home() / "probes" / (run_id or Path(where).name)
    result = run_probes(model, cfg, out_dir, settings, normalisation=recorded_normalisation(state))
    tracker = StudyTracker(tracking_uri, experiment)
    tags.update({f"{TAG_PREFIX}{k}": v for k, v in git_state().items()})
    tags[CONFIG_HASH_TAG] = cfg.config_hash()
    params = {
        **cfg.flat(),
        **settings.params(),
        "probe.checkpoint": where,
        "probe.epochs_done": state["epochs_done"],
    }
    child = tracker.start_run(name, params=params, tags=tags, parent_run_id=run_id)
    tracker.log_metrics(child, result.metrics, step=int(state["epochs_done"]))
    for figure in [*result.figures, out_dir / "probe_metrics.json"]:
        tracker.log_artifact(child, figure, ARTIFACT_DIR)
    tracker.end_run(child, "FINISHED")
    return ProbeRun(child, where, out_dir, result)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def probe_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line of `studies/interpretability_probe.py`."""
    parser = probe_parser(prog)
    args = parser.parse_args(argv)
    if args.run_id is None and args.checkpoint is None:
        parser.error("give --run-id, --checkpoint, or both")
    try:
        settings = _settings_from_args(args)
        overrides = dict(parse_override(text) for text in args.overrides)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))
    uri = args.tracking_uri or default_tracking_uri()
    try:
        done = probe_run(
            uri,
            args.run_id,
            checkpoint=args.checkpoint,
            storage_path=args.storage_path,
            overrides=overrides,
            settings=settings,
            out_dir=args.out_dir,
        )
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in sorted(done.result.metrics.items()):
        print(f"{key:45s} {value:.4f}")
    print(f"checkpoint: {done.checkpoint}")
    print(f"figures: {done.out_dir}")
    print(f"MLflow run {done.run_id} in {uri}")
    return 0


def probe_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `probe_main`: what to probe, where it logs, and the probe settings."""
    defaults = ProbeSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the interpretability probes on a finished run and log them to MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run-id", default=None, help="the MLflow run (a study's trial) to probe")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a checkpoint folder, its state.pt, or a training run folder with checkpoint_* "
        "(default: located from the run, see --storage-path)",
    )
    parser.add_argument(
        "--storage-path",
        default=None,
        help="the study's Ray results folder, where trial_<id>/ holds the trial's checkpoints "
        "(default: <CBTLAB_HOME>/ray_results)",
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ~/.cbtlab"
    )
    add_override_argument(parser)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--eps", type=float, default=defaults.eps)
    parser.add_argument(
        "--reference-eps",
        action="store_true",
        help="coding rates with the reference code's p / (n eps) instead of p / (n eps^2)",
    )
    parser.add_argument("--noise-scales", default=",".join(f"{s:g}" for s in defaults.noise_scales))
    parser.add_argument(
        "--robustness-images",
        type=int,
        default=defaults.robustness_images,
        help="the first this many validation images (all of the digits)",
    )
    parser.add_argument("--overlay-images", type=int, default=defaults.overlay_images)
    parser.add_argument(
        "--layers", default="", help="layers to draw maps of, e.g. 0,-1 (default: all)"
    )
    parser.add_argument(
        "--voc-root", default="", help="a PASCAL VOC folder: add zero-shot segmentation"
    )
    parser.add_argument("--voc-split", default="val")
    parser.add_argument("--voc-images", type=int, default=0, help="0: the whole split")
    parser.add_argument("--seg-layer", type=int, default=-1)
    parser.add_argument("--seg-mass", type=float, default=0.6)
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: <CBTLAB_HOME>/probes/<run id>"
    )
    return parser


def _settings_from_args(args: argparse.Namespace) -> ProbeSettings:
    return ProbeSettings(
        samples=args.samples,
        eps=args.eps,
        squared_eps=not args.reference_eps,
        noise_scales=_floats(args.noise_scales),
        robustness_images=args.robustness_images,
        overlay_images=args.overlay_images,
        overlay_layers=_ints(args.layers) or None,
        voc_root=args.voc_root,
        voc_split=args.voc_split,
        voc_images=args.voc_images,
        segmentation=SegmentationSettings(layer=args.seg_layer, mass=args.seg_mass),
    )
