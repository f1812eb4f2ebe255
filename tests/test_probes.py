"""Interpretability probes: representatives and their coding rates, CLS attention overlays,
zero-shot segmentation (IoUs, the VOC reader), and the probe of a finished run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbtlab.analysis import (
    VOCSegmentation,
    boundary_band,
    cls_attention_maps,
    coding_rate,
    head_coding_rates,
    head_representatives,
    mass_threshold,
    plot_attention_overlays,
    segmentation_ious,
    zero_shot_segmentation,
)
from cbtlab.analysis.attention_maps import upsample_maps
from cbtlab.analysis.interpretability import locate_checkpoint, probe_main, read_checkpoint
from cbtlab.analysis.segmentation import iou
from cbtlab.attention import CBSA
from cbtlab.attention.common import merge_heads
from cbtlab.checkpoint import CheckpointError
from cbtlab.config import ExperimentConfig
from cbtlab.models import CBTransformer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_model(attention: str = "mssa,cbsa", depth: int = 2) -> CBTransformer:
    torch.manual_seed(0)
    return CBTransformer(
        img_size=16,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=24,
        depth=depth,
        num_heads=3,
        attention=attention,
        attn_options={"rep_grid": (2, 2)},
    ).eval()


# --- representatives and their coding rates (Fig. 6) --------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"contraction": "exact"}, {"rep_init": "learned"}, {"rep_pool": "max"}],
)
def test_representatives_rebuild_the_reference_forward(options: dict) -> None:
    torch.manual_seed(0)
    attn = CBSA(24, 3, rep_grid=(2, 2), **options)
    x, grid = torch.randn(2, 17, 24), (4, 4)
    q = attn.representatives(x, grid)  # (B, K, m, p)
    assert q.shape == (2, 3, 4, 8)
    a = attn.extraction(x, grid)
    dw = attn.step_x.view(1, 3, 1, 1) * (a.transpose(-1, -2) @ attn.contract(q))
    torch.testing.assert_close(attn.proj(merge_heads(dw)), attn.forward_reference(x, grid))


def _direct_rate(x: torch.Tensor, eps: float, squared: bool = True) -> float:
    n, p = x.shape
    alpha = p / (n * (eps**2 if squared else eps))
    x = x.double()
    return 0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + alpha * x.T @ x).item()


def test_head_coding_rates_of_tokens_and_representatives() -> None:
    model = _tiny_model()
    images = torch.randn(3, 1, 16, 16)
    pairs = head_representatives(model, images)
    assert pairs[0] is None  # MSSA
    w, q = pairs[1]
    assert w.shape == (3, 3, 65, 8) and q.shape == (3, 3, 4, 8)
    for squared, eps in ((True, 0.5), (False, 0.01)):
        rates = head_coding_rates(model, images, eps, squared_eps=squared)
        assert [r.layer for r in rates] == [1]
        for k in range(3):
            tokens = np.mean([_direct_rate(w[b, k], eps, squared) for b in range(3)])
            reps = np.mean([_direct_rate(q[b, k], eps, squared) for b in range(3)])
            assert rates[0].tokens[k] == pytest.approx(tokens, rel=1e-6)
            assert rates[0].representatives[k] == pytest.approx(reps, rel=1e-6)
    # m = 4 representatives in p = 8 dims: the rate is bounded by their 4 directions
    assert coding_rate(q, 0.5).shape == (3, 3)


# --- attention maps over the images (Fig. 7) -----------------------------------------------


def test_cls_maps_per_layer_and_their_overlays(tmp_path: Path) -> None:
    model = _tiny_model("tssa,mssa,cbsa", depth=3)
    images = torch.randn(2, 1, 16, 12)  # non-square: an 8 x 6 patch grid
    maps = cls_attention_maps(model, images)
    assert maps[0] is None  # TSSA has no token-to-token map
    assert maps[1].shape == maps[2].shape == (2, 3, 8, 6)
    # MSSA: a softmax row over all 1 + 48 tokens, the CLS entry dropped
    total = maps[1].sum((-2, -1))
    assert torch.all((total > 0) & (total < 1))
    # CBSA: the CLS row of A^T A on the patches
    x, grid = model._embed(images)
    x = model.blocks[1](model.blocks[0](x, grid), grid)
    expected = model.blocks[2].attn.attention_map(model.blocks[2].norm1(x), grid)
    torch.testing.assert_close(maps[2], expected[:, :, 0, 1:].reshape(2, 3, 8, 6))

    path = tmp_path / "overlay.png"
    plot_attention_overlays(torch.rand(2, 1, 16, 12), maps[2], path, title="layer 2")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as png:
        png.verify()


def test_upsampled_maps_keep_the_grid_layout() -> None:
    grid = torch.zeros(1, 2, 2)
    grid[0, 0, 1] = 1.0  # top-right patch
    up = upsample_maps(grid, (8, 8))
    assert up.shape == (1, 8, 8)
    assert up[0, :4, 4:].mean() > 0.5 > up[0, 4:, :4].mean()


# --- zero-shot segmentation: thresholds and IoUs on hand-made masks -----------------------


def test_mass_threshold_keeps_the_top_pixels_up_to_the_mass() -> None:
    maps = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    # total 10: 4 (0 before), 3 (4 before < 6) kept; 2 (7 before >= 6) dropped
    assert mass_threshold(maps, 0.6).tolist() == [[True, True], [False, False]]
    assert mass_threshold(maps, 0.3).tolist() == [[True, False], [False, False]]
    support = torch.tensor([[0.0, 2.0], [0.0, 5.0]])
    assert mass_threshold(support, 1.0).tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError, match="mass"):
        mass_threshold(maps, 0.0)


def test_foreground_and_background_iou_by_hand() -> None:
    label = torch.zeros(4, 4, dtype=torch.uint8)
    label[:, :2] = 7  # left half: an object (any class)
    pred = torch.zeros(4, 4, dtype=torch.bool)
    pred[:2, :2] = True  # top-left quarter
    scores = segmentation_ious(pred, label, boundary_width=1)
    assert scores["fg_iou"].item() == pytest.approx(4 / 8)
    assert scores["bg_iou"].item() == pytest.approx(8 / 12)
    # void pixels are not scored: make the two object pixels the prediction misses void
    label[2:, :2] = 255
    label[0, 3] = 255  # and one background pixel
    scores = segmentation_ious(pred, label, boundary_width=1)
    assert scores["fg_iou"].item() == pytest.approx(1.0)
    assert scores["bg_iou"].item() == pytest.approx(7 / 7)
    # a batch of predictions against one label; an empty union scores 1
    both = torch.stack([pred, ~pred])
    assert segmentation_ious(both, label, 1)["fg_iou"].tolist() == pytest.approx([1.0, 0.0])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert iou(empty, empty).item() == 1.0


def test_boundary_band_and_boundary_iou_by_hand() -> None:
    square = torch.zeros(6, 6, dtype=torch.bool)
    square[1:5, 1:5] = True  # 4 x 4
    band = boundary_band(square, 1)
    assert band.sum().item() == 12  # its ring: 16 - the 2 x 2 inside
    assert not band[2:4, 2:4].any()
    assert boundary_band(square, 2).sum().item() == 16
    full = torch.ones(6, 6, dtype=torch.bool)
    assert boundary_band(full, 1).sum().item() == 20  # the image border counts as outside

    label = square.to(torch.uint8)  # class 1 on the square
    assert segmentation_ious(square, label, 1)["boundary_iou"].item() == 1.0
    assert segmentation_ious(full, label, 1)["boundary_iou"].item() == 0.0
    bigger = torch.zeros(6, 6, dtype=torch.bool)
    bigger[1:6, 1:6] = True  # 5 x 5: ring of 16, shares 7 pixels with the square's ring
    assert segmentation_ious(bigger, label, 1)["boundary_iou"].item() == pytest.approx(7 / 21)


# --- the VOC layout -----------------------------------------------------------------------


def _palette_png(label: np.ndarray, path: Path) -> None:
    png = Image.fromarray(label, mode="P")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]
    png.putpalette(palette)
    png.save(path)


def make_voc(root: Path, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """A VOC-layout folder: per image a bright square (class 1 or 2) on a dark background,
    its label with a 1-pixel void outline. Returns the labels."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels, ids = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"2007_{i:06d}"
        ids.append(name)
        label = np.zeros((h, w), dtype=np.uint8)
        top, left = h // 4, w // 4
        label[top - 1 : top + h // 2 + 1, left - 1 : left + w // 2 + 1] = 255
        label[top : top + h // 2, left : left + w // 2] = 1 + i % 2
        image = np.full((h, w, 3), 20, dtype=np.uint8)
        image[label == 1 + i % 2] = (230, 200, 40)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        _palette_png(label, root / "SegmentationClass" / f"{name}.png")
        labels.append(label)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return labels


def test_voc_reader_reads_images_and_palette_labels(tmp_path: Path) -> None:
    labels = make_voc(tmp_path / "VOC", [(24, 32), (40, 28), (32, 32)])
    voc = VOCSegmentation(tmp_path / "VOC", "val")
    assert len(voc) == 3 and voc.ids[0] == "2007_000000"
    for i, truth in enumerate(labels):
        image, label = voc[i]
        assert image.mode == "RGB" and image.size == (truth.shape[1], truth.shape[0])
        assert label.dtype == torch.uint8
        assert np.array_equal(label.numpy(), truth)
        assert set(label.unique().tolist()) == {0, 1 + i % 2, 255}
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        VOCSegmentation(tmp_path / "VOC", "train")  # no train.txt
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="PASCAL VOC layout"):
        VOCSegmentation(tmp_path / "empty")


def test_oracle_maps_segment_perfectly(tmp_path: Path) -> None:
    """A map that is the object itself scores 1 on every IoU through the protocol
    (threshold, void outline ignored); its complement scores 0 on the foreground."""
    make_voc(tmp_path / "VOC", [(32, 24)])
    _, label = VOCSegmentation(tmp_path / "VOC")[0]
    oracle = (label == 1).float()[None]
    masks = mass_threshold(upsample_maps(torch.cat([oracle, 1 - oracle]), (32, 24)), 1.0)
    scores = segmentation_ious(masks, label, boundary_width=2)
    assert scores["fg_iou"].tolist() == [1.0, 0.0]
    assert scores["bg_iou"].tolist() == [1.0, 0.0]
    assert scores["boundary_iou"][0].item() == 1.0


def test_zero_shot_segmentation_runs_on_a_voc_folder(tmp_path: Path) -> None:
    make_voc(tmp_path / "VOC", [(24, 32), (40, 28), (32, 32)])
    model = _tiny_model()
    metrics = zero_shot_segmentation(
        model, VOCSegmentation(tmp_path / "VOC"), img_size=16, mean=[0.5], std=[0.25]
    )
    assert metrics["seg/images"] == 3
    for kind in ("fg_iou", "bg_iou", "boundary_iou"):
        keys = [f"seg/layer_01/{kind}/head_{h:02d}" for h in range(3)]
        for key in [*keys, f"seg/layer_01/{kind}/combined"]:
            assert 0 <= metrics[key] <= 1, key


# --- the probe of a finished run ----------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(digits_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A hybrid MSSA + CBSA model trained 2 epochs on the digits, its checkpoints where a
    study's trial keeps them (<storage>/trial_<id>/checkpoint_*) and its MLflow trial run."""
    from cbtlab.checkpoint import save_state
    from cbtlab.tracking import StudyTracker
    from cbtlab.tracking.schema import run_params
    from cbtlab.train import run_training

    cfg = ExperimentConfig().with_overrides(
        {
            "model.attention": "mssa,cbsa",
            "model.embed_dim": 24,
            "model.depth": 2,
            "model.rep_grid": "2x2",
            "train.epochs": 2,
            "train.num_workers": 1,
            "data.batch_size": 128,
        }
    )
    states: list[dict] = []
    run_training(cfg, report=lambda metrics, state: states.append(state))
    root = tmp_path_factory.mktemp("probe")
    storage = root / "ray_results"
    trial = storage / "trial_0a1b2c3d"
    save_state(states[0], trial / "checkpoint_2025-01-01_10-00-00.000001")
    save_state(states[1], trial / "checkpoint_2025-01-01_10-00-09.000001")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = StudyTracker(uri, "probe_test")
    run_id = tracker.start_run(
        "trial_0a1b2c3d",
        params=run_params(cfg),
        tags={"cbtlab.role": "trial", "cbtlab.trial_id": "0a1b2c3d"},
    )
    tracker.end_run(run_id, "FINISHED")
    return {"cfg": cfg, "states": states, "storage": storage, "uri": uri, "run_id": run_id}


def test_checkpoint_is_located_from_the_trial_run(finished_run, tmp_path: Path) -> None:
    trial = finished_run["storage"] / "trial_0a1b2c3d"
    tags = {"cbtlab.trial_id": "0a1b2c3d"}
    assert locate_checkpoint(tags, storage_path=finished_run["storage"]) == str(trial)
    state, where = read_checkpoint(trial)
    assert where.endswith("checkpoint_2025-01-01_10-00-09.000001")  # the latest
    assert state["epochs_done"] == 2
    assert read_checkpoint(Path(where) / "state.pt")[1] == where
    tagged = {**tags, "cbtlab.checkpoint": "/somewhere/checkpoint_x"}
    assert locate_checkpoint(tagged) == "/somewhere/checkpoint_x"  # a recorded tag wins
    with pytest.raises(CheckpointError, match="--storage-path"):
        locate_checkpoint(tags, storage_path=tmp_path)
    with pytest.raises(CheckpointError, match="--checkpoint"):
        locate_checkpoint({})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path)


def test_probe_logs_every_metric_and_figure_to_a_child_run(finished_run, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    make_voc(tmp_path / "VOC", [(24, 32), (32, 32)])
    run_id, uri = finished_run["run_id"], finished_run["uri"]
    scales = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]
    argv = [
        "--run-id", run_id,
        "--storage-path", str(finished_run["storage"]),
        "--tracking-uri", uri,
        "--samples", "32",
        "--overlay-images", "3",
        "--voc-root", str(tmp_path / "VOC"),
        "--out-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert probe_main(argv) == 0

    client = MlflowClient(tracking_uri=uri)
    [child] = client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
    )
    assert child.info.status == "FINISHED"
    assert child.data.tags["cbtlab.role"] == "probe"
    assert child.data.params["model.attention"] == "mssa,cbsa"
    assert child.data.params["probe.checkpoint"].endswith("10-00-09.000001")
    metrics = child.data.metrics
    expected = {"rc/layer_00", "rc/layer_01", "rc_norm/layer_00", "rc_norm/layer_01"}
    for h in range(3):
        expected |= {
            f"rcr_tokens/layer_01/head_{h:02d}",
            f"rcr_reps/layer_01/head_{h:02d}",
            f"extraction_rank/layer_01/head_{h:02d}",
        }
        expected |= {f"seg/layer_01/{k}/head_{h:02d}" for k in ("fg_iou", "bg_iou")}
    expected |= {f"robustness/top1/scale_{s:g}" for s in scales}
    expected |= {"seg/layer_01/boundary_iou/combined", "seg/images"}
    assert expected <= set(metrics), expected - set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(1 <= metrics[f"extraction_rank/layer_01/head_{h:02d}"] <= 4 for h in range(3))
    # scale 0 is the clean model: exactly the checkpoint's own val/top1 (all 360 images)
    assert metrics["robustness/top1/scale_0"] == finished_run["states"][1]["metrics"]["val/top1"]
    history = client.get_metric_history(child.info.run_id, "rc/layer_01")
    assert [m.step for m in history] == [2]  # the checkpoint's epochs done

    figures = {
        "compression.png",
        "coding_rates.png",
        "attention_layer_00.png",
        "attention_layer_01.png",
        "robustness.png",
    }
    logged = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "probes")}
    assert figures | {"probe_metrics.json"} <= logged
    local = Path(client.download_artifacts(child.info.run_id, "probes", str(tmp_path / "dl")))
    for name in figures:
        assert (local / name).read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(local / name) as png:
            png.verify()
    assert (tmp_path / "out" / "coding_rates.png").is_file()


def test_probe_of_a_checkpoint_alone(finished_run, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = finished_run["storage"] / "trial_0a1b2c3d"
    argv = [
        "--checkpoint", str(trial),
        "--tracking-uri", uri,
        "--samples", "16",
        "--noise-scales", "0",
        "--layers", "-1",
        "--out-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert probe_main(argv) == 0
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("interpretability_probe").experiment_id]
    )
    assert "rcr_reps/layer_01/head_00" in run.data.metrics
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "probes")}
    assert "attention_layer_01.png" in names and "attention_layer_00.png" not in names
