"""Fine-tuning (`train.init_from`): a digits model's backbone under a new head, at another image
size, normalised as the digits were; the authors' checkpoint layout (ImageNet's normalisation);
weights that do not fit."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbtlab.checkpoint import CheckpointError, save_state
from cbtlab.config import ExperimentConfig
from cbtlab.data import open_split, prepare_dataset
from cbtlab.data.shards import Sample, write_card, write_split
from cbtlab.data.transforms import image_stats
from cbtlab.models import build_model
from cbtlab.models.transformer import resample_pos_embed
from cbtlab.train import run_training
from cbtlab.train.finetune import init_from, normalisation, read_start

TINY = {
    "model.embed_dim": 24,
    "model.depth": 1,
    "model.num_heads": 3,
    "model.rep_grid": "2x2",
    "train.num_workers": 1,
}


def _five_classes(out: Path, *, train: int = 200, val: int = 50) -> Path:
    """8 x 8 grey images of 5 classes (a bright row at label + 1, plus noise)."""
    rng = np.random.default_rng(0)

    def samples(split: str, count: int):
        for i in range(count):
            label = i % 5
            pixels = rng.integers(0, 60, (8, 8), dtype=np.uint8)
            pixels[label + 1] = 255
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            yield Sample(key=f"{split}{i:04d}", image=buf.getvalue(), ext="png", label=label)

    out.mkdir(parents=True)
    train_shards, train_rows = write_split(samples("train", train), out, "train", 50)
    val_shards, val_rows = write_split(samples("val", val), out, "val", 25)
    write_card(
        out,
        "five",
        {"train": train_shards, "val": val_shards},
        train_rows + val_rows,
        num_classes=5,
        image_ext="png",
        extra={"channels": 1, "mean": [0.2], "std": [0.3]},
    )
    return out


def test_fine_tuning_keeps_the_backbone_under_a_new_head(digits_root: Path, tmp_path: Path) -> None:
    states: list[dict] = []
    digits = ExperimentConfig().with_overrides({**TINY, "train.epochs": 1})
    run_training(digits, report=lambda m, s: states.append(s))
    save_state(states[-1], tmp_path / "digits")
    source = states[-1]["model"]

    cfg = ExperimentConfig().with_overrides(
        {
            **TINY,
            "data.dataset": "shards",
            "data.root": str(_five_classes(tmp_path / "five")),
            "data.augment": "none",
            "data.batch_size": 25,
            "model.num_classes": 5,
            "model.img_size": 24,  # a 12 x 12 patch grid; the digits model had 8 x 8
            "train.init_from": str(tmp_path / "digits"),
            "train.head_only_epochs": 1,
            "train.backbone_lr_scale": 0.5,
            "train.epochs": 2,
        }
    )
    tuned: list[tuple[dict, dict]] = []
    run_training(cfg, report=lambda m, s: tuned.append((m, s)))
    head_only = tuned[0][1]["model"]
    assert head_only["head.weight"].shape == (5, 24) and head_only["head.bias"].shape == (5,)
    expected_pos = resample_pos_embed(source["pos_embed"], (8, 8), (12, 12))
    assert head_only["pos_embed"].shape == (1, 1 + 144, 24)
    torch.testing.assert_close(head_only["pos_embed"], expected_pos)
    # The first epoch trained the head alone: every other tensor is the checkpoint's, exactly.
    for key, value in head_only.items():
        if not key.startswith("head.") and key != "pos_embed":
            assert torch.equal(value, source[key]), key
    final, metrics = tuned[1][1]["model"], tuned[1][0]
    assert not torch.equal(final["blocks.0.mlp.weight"], source["blocks.0.mlp.weight"])
    assert math.isfinite(metrics["val/loss"]) and metrics["val/samples"] == 50
    # Normalised as the digits were (the weights' record), not with the new card's 0.2 / 0.3.
    _, digits_mean, digits_std = image_stats(open_split(prepare_dataset(digits.data), "train"))
    assert states[-1]["data_config"] == {"mean": digits_mean, "std": digits_std}
    assert digits_mean != [0.2] and digits_std != [0.3]
    for _, state in tuned:
        assert state["data_config"] == {"mean": digits_mean, "std": digits_std}
    # A resumed run keeps its recorded normalisation; a start without a record, the card's.
    resumed = {**tuned[0][1], "data_config": {"mean": [0.7], "std": [0.1]}}
    assert normalisation(cfg, read_start(tmp_path / "digits"), resumed) == ([0.7], [0.1])
    torch.save(source, tmp_path / "bare.pt")
    assert normalisation(cfg, read_start(tmp_path / "bare.pt"), None) is None


# Our names -> the reference code's (the inverse of cbtlab.models.reference's rules).
_TO_REFERENCE = [
    (r"^patch_embed\.proj\.", "to_patch_embedding.proj."),
    (r"^pos_embed$", "pos_embedding"),
    (r"^blocks\.(\d+)\.norm1\.", r"transformer.layers.\1.0.norm."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"transformer.layers.\1.0.fn.proj.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.layers.\1.0.fn.to_out."),
    (r"^blocks\.(\d+)\.attn\.(step_x|step_rep)$", r"transformer.layers.\1.0.fn.\2"),
    (r"^blocks\.(\d+)\.norm2\.", r"transformer.layers.\1.1.norm."),
    (r"^blocks\.(\d+)\.mlp\.weight$", r"transformer.layers.\1.1.fn.weight"),
    (r"^norm\.", "mlp_head.0."),
    (r"^head\.", "mlp_head.1."),
    (r"^cls_token$", "cls_token"),
]


def _reference_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        pattern, target = next((p, t) for p, t in _TO_REFERENCE if re.match(p, key))
        name = re.sub(pattern, target, key)
        step_size = name.endswith(("step_x", "step_rep"))  # (K,) here, (K, 1, 1) there
        out[f"module.{name}"] = value[:, None, None] if step_size else value
    return out


def test_the_authors_checkpoint_layout_loads_with_a_new_head(tmp_path: Path) -> None:
    conv = {**TINY, "model.stem": "conv"}  # the reference models' stem
    torch.manual_seed(1)
    theirs = build_model(ExperimentConfig().with_overrides(conv).model)
    reference = {
        "epoch": 150,
        "arch": "Ours_tiny",
        "state_dict": _reference_layout(theirs.state_dict()),
    }
    torch.save(reference, tmp_path / "model_best.pth.tar")
    torch.manual_seed(2)
    ours = build_model(ExperimentConfig().with_overrides({**conv, "model.num_classes": 5}).model)
    notes = init_from(ours, tmp_path / "model_best.pth.tar")
    assert notes == ["a new head: 5 classes (the checkpoint's has 10)"]
    # The authors trained on ImageNet: a fine-tune from their weights normalises as they did,
    # and a model of another channel count is refused before any data is read.
    start = read_start(tmp_path / "model_best.pth.tar")
    rgb = ExperimentConfig().with_overrides({**conv, "model.in_chans": 3})
    assert normalisation(rgb, start, None) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    grey = ExperimentConfig().with_overrides(conv)
    with pytest.raises(CheckpointError, match="3-channel images"):
        normalisation(grey, start, None)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert key.startswith("head.") or torch.equal(a, b), key


def test_weights_that_do_not_fit_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    def model(**overrides: object) -> torch.nn.Module:
        return build_model(ExperimentConfig().with_overrides({**TINY, **overrides}).model)

    torch.save(model().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"lacks 'blocks\.1\."):
        init_from(model(**{"model.depth": 2}), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"cls_token has shape \(1, 1, 24\).*\(1, 1, 48\)"):
        init_from(model(**{"model.embed_dim": 48}), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        init_from(model(), tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        init_from(model(), tmp_path / "junk.pt")


def test_a_checkpoint_uri_is_fetched_first(tmp_path: Path) -> None:
    """A study on cluster storage records its checkpoints as URIs (s3://...); file:// stands in."""
    torch.manual_seed(3)
    source = build_model(ExperimentConfig().with_overrides(TINY).model)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save(source.state_dict(), folder / "state.pt")
    torch.manual_seed(4)
    target = build_model(ExperimentConfig().with_overrides(TINY).model)
    assert init_from(target, folder.as_uri()) == []
    for a, b in zip(target.state_dict().values(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match=r"no such checkpoint file|cannot fetch"):
        init_from(target, (tmp_path / "absent").as_uri())
