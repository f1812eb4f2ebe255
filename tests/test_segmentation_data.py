"""Segmentation data (cbtlab.data.segmentation, cbtlab.data.seg_transforms): the generated
dataset in the ADE20K layout, the reader's errors, the shards and the joint augmentation; and a
decoder trained through the segmentation worker beating the majority-class baseline."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cbtlab.analysis.segmentation import VOID
from cbtlab.data import open_split
from cbtlab.data.build import build_shards
from cbtlab.data.cli import build_main
from cbtlab.data.seg_transforms import (
    SegEvalTransform,
    SegTrainTransform,
    seg_loader,
    split_shards,
)
from cbtlab.data.segmentation import (
    MASK_KEY,
    ADE20KSource,
    SegmentationDataError,
    ade20k_main,
    ade20k_pairs,
    convert_mask,
    ensure_shapes,
    iter_shard_samples,
    write_segmentation_shards,
    write_shapes_layout,
)
from cbtlab.data.verify import verify_shards

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    return write_shapes_layout(root, num_train=6, num_val=3, size=32, num_classes=4)


def test_generated_layout_is_ade20ks(layout: Path) -> None:
    assert layout.name == "ADEChallengeData2016"
    pairs = ade20k_pairs(layout.parent, "train")
    assert len(pairs) == 6 and len(ade20k_pairs(layout, "val")) == 3
    mask = np.asarray(Image.open(pairs[0].mask))
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4} and 1 in mask
    converted = convert_mask(pairs[0].mask, 4)
    assert converted[mask == 0].tolist() == [VOID] * int((mask == 0).sum())
    assert (converted[mask == 1] == 0).all()


def test_reader_names_an_image_without_its_mask(layout: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ADEChallengeData2016"
    for sub in ("images/training", "annotations/training"):
        (broken / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(broken / "images/training/ADE_x_1.jpg")
    with pytest.raises(SegmentationDataError, match=r"ADE_x_1\.jpg: image without its mask"):
        ade20k_pairs(tmp_path, "train")


def test_class_names_come_from_the_releases_table(layout: Path, tmp_path: Path) -> None:
    """ADE20K's objectInfo150.txt (tab-separated; a name is its first synonym, and may hold
    spaces); labels it lacks, and a layout without it, get `class_<label>`."""
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(layout, root)
    (root / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
        "2\t0.0051\t1080\t89\tchest of drawers;chest;bureau;dresser\n"
    )
    source = ADE20KSource(tmp_path, num_classes=3)
    assert source.class_names == ("wall", "chest of drawers", "class_3")
    (root / "objectInfo150.txt").unlink()
    assert ADE20KSource(root, num_classes=2).class_names == ("class_1", "class_2")


def test_reader_names_a_mask_beyond_the_classes(layout: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((4, 4), 151, dtype=np.uint8)).save(bad)
    with pytest.raises(SegmentationDataError, match=r"bad\.png: mask value 151 exceeds the 150"):
        convert_mask(bad, 150)
    # through the shard writer: the generated masks hold classes up to 4
    with pytest.raises(SegmentationDataError, match=r"ADE_train.*\.png: mask value 4 exceeds"):
        write_segmentation_shards(layout, tmp_path / "shards", num_classes=3)


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_a_stopped_build_goes_on_and_processes_write_the_same(layout: Path, tmp_path: Path) -> None:
    """A bad validation mask stops the build naming it, after the training shards; fixed and
    run again, the build keeps those shards (not rewritten) and writes the rest; run once more,
    it writes nothing. Two processes write the same shards and card; a new plan's card lists
    only its own shards."""
    source = tmp_path / "src"
    shutil.copytree(layout, source / layout.name)
    bad = ade20k_pairs(source, "val")[1].mask
    good = bad.read_bytes()
    Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(bad)
    out = tmp_path / "shards"
    with pytest.raises(SegmentationDataError, match=rf"{bad.name}: mask value 9 exceeds"):
        write_segmentation_shards(source, out, num_classes=4, samples_per_shard=2)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert sorted(first) == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(first)  # no temp file
    bad.write_bytes(good)
    write_segmentation_shards(source, out, num_classes=4, samples_per_shard=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")} == first
    assert open_split(out, "val").num_samples == 3
    again = build_shards(
        ADE20KSource(source, num_classes=4), out, samples_per_shard=2, local=True, progress=False
    )
    assert again.written == [] and len(again.skipped) == 5

    parallel = write_segmentation_shards(
        source, tmp_path / "parallel", num_classes=4, samples_per_shard=2, workers=2
    )
    assert _shard_files(parallel) == _shard_files(out)
    for split in ("train", "val"):
        ours, theirs = open_split(out, split), open_split(parallel, split)
        assert ours.content_hash == theirs.content_hash  # the manifests' rows
        rows = [r for r in pq.read_table(theirs.manifest).to_pylist() if r["split"] == split]
        assert len(rows) == ours.num_samples
        assert {r["shard"] for r in rows} == {Path(s.path).name for s in theirs.shards}
    write_segmentation_shards(source, out, num_classes=4, samples_per_shard=4)
    carded = [
        Path(s.path).name for split in ("train", "val") for s in open_split(out, split).shards
    ]
    assert carded == ["train-00000.tar", "train-00001.tar", "val-00000.tar"]
    assert verify_shards(out).ok


def test_shards_hold_images_and_converted_masks(layout: Path, tmp_path: Path) -> None:
    """Every sample's image and converted mask, the label its mask's most frequent class, the
    class names from the layout's table, ImageNet's normalisation; verify reads the masks."""
    out = write_segmentation_shards(layout, tmp_path / "shards", num_classes=4, samples_per_shard=4)
    train = open_split(out, "train")
    assert train.num_samples == 6 and len(train.shards) == 2
    assert train.extra["task"] == "segmentation" and train.extra["ignore_index"] == VOID
    assert train.extra["members"] == [MASK_KEY] and train.extra["mean"] == [0.485, 0.456, 0.406]
    pairs = {p.key: p for p in ade20k_pairs(layout, "train")}
    samples = {key: (image, mask) for key, image, mask in iter_shard_samples(train.urls)}
    assert sorted(samples) == sorted(pairs)
    for key, (image, mask) in samples.items():
        assert image.size == (32, 32) and mask.shape == (32, 32)
        np.testing.assert_array_equal(mask, convert_mask(pairs[key].mask, 4))
    for row in pq.read_table(train.manifest).to_pylist():
        if row["split"] == "train":
            mask = samples[row["key"]][1]
            assert row["label"] == np.bincount(mask[mask != VOID].ravel()).argmax()
    card_names = json.loads((out / "card.json").read_text())["class_names"]
    assert card_names == ["background", "red disc", "green square", "blue triangle"]
    assert verify_shards(out).ok

    # one flipped byte of a mask is caught by the manifest's checksum, which covers it
    shard = out / train.shards[0].path
    data = bytearray(shard.read_bytes())
    first_mask = data.find(b"IDAT", data.find(b".seg.png"))
    data[first_mask + 8] ^= 0xFF
    shard.write_bytes(bytes(data))
    kinds = {p.kind for p in verify_shards(out).problems}
    assert kinds == {"checksum mismatch"}, verify_shards(out).problems


def test_the_command_generates_builds_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shapes"
    argv = ["--generate", "--output", str(out), "--samples-per-shard", "32", "--quiet"]
    assert ade20k_main([*argv, "--workers", "2"]) == 0
    assert "96 training images, 24 validation images, 4 classes; 4 shards written, 0 already" in (
        capsys.readouterr().out
    )
    assert ade20k_main(argv) == 0  # the same build again: nothing to write
    assert "0 shards written, 4 already complete" in capsys.readouterr().out
    assert ade20k_main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    assert "expected the ADEChallengeData2016 layout" in capsys.readouterr().err
    assert ade20k_main([*argv, "--workers", "0"]) == 1
    assert "workers must be at least 1" in capsys.readouterr().err
    # build_shards.py names the input, not the output, for a wrong layout
    nowhere = ["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--local"]
    with pytest.raises(SystemExit):
        build_main(["--source", "ade20k", *nowhere])
    err = capsys.readouterr().err
    assert "expected the ADEChallengeData2016 layout" in err and "cannot write" not in err
    # a bad mask found while writing: the file named, the finished shards kept (exit 1)
    source = out / "source" / "ADEChallengeData2016"
    bad = sorted((source / "annotations" / "validation").glob("*.png"))[0]
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(bad)  # beyond 150
    argv = ["--source", "ade20k", "--input", str(source), "--output", str(tmp_path / "b")]
    assert build_main([*argv, "--local", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{bad.name}: mask value 200 exceeds" in err and "finished shards are kept" in err


def test_joint_augmentation_keeps_image_and_mask_aligned() -> None:
    # an image whose red channel encodes the class: after resize, crop and flip it still does
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, 30:] = 1
    mask[:5] = VOID
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[..., 0] = np.where(mask == 1, 255, 0)
    transform = SegTrainTransform(
        crop=24, base_size=30, photometric=False, mean=(0, 0, 0), std=(1, 1, 1)
    )
    for seed in range(8):
        image, labels = transform(Image.fromarray(pixels), mask, random.Random(seed))
        assert image.shape == (3, 24, 24) and labels.shape == (24, 24)
        # bilinear resizing blurs the image's edge, not the mask's (nearest): away from it
        # they agree
        sure = (labels != VOID) & ((image[0] < 0.2) | (image[0] > 0.8))
        assert sure.sum() >= 0.8 * (labels != VOID).sum()
        assert torch.equal((image[0] > 0.5)[sure], (labels == 1)[sure])
        assert set(labels.unique().tolist()) <= {0, 1, VOID}


def test_crop_is_padded_with_ignored_pixels_and_eval_resizes_the_short_side() -> None:
    mask = np.ones((10, 10), dtype=np.uint8)
    transform = SegTrainTransform(
        crop=16, base_size=10, scale_range=(1.0, 1.0), flip=False, photometric=False
    )
    _, labels = transform(Image.new("RGB", (10, 10)), mask, random.Random(0))
    assert (labels[:10, :10] == 1).all() and (labels[10:] == VOID).all()
    image, labels = SegEvalTransform(20)(Image.new("RGB", (10, 15)), np.ones((15, 10), np.uint8))
    assert image.shape == (3, 30, 20) and labels.shape == (15, 10)  # scored at the original
    resized = SegEvalTransform(20, at_original=False)
    image, labels = resized(Image.new("RGB", (10, 15)), np.ones((15, 10), np.uint8))
    assert image.shape == (3, 30, 20) and labels.shape == (30, 20)


def test_loader_splits_samples_over_ranks(tmp_path: Path) -> None:
    root = ensure_shapes(tmp_path, num_train=10, num_val=5, size=32, samples_per_shard=4)
    val = open_split(root, "val")
    transform = SegEvalTransform(32)
    seen = [
        sum(
            int(b[0].shape[0])
            for b in seg_loader(
                val.urls, transform, batch_size=1, train=False, rank=r, world_size=2
            )
        )
        for r in range(2)
    ]
    assert seen == [4, 1]  # shard 0 (4 samples) to rank 0, shard 1 (1 sample) to rank 1
    assert ensure_shapes(tmp_path, num_train=10, num_val=5, size=32, samples_per_shard=4) == root


@pytest.mark.parametrize("shards", [1, 3, 4, 9, 16])
@pytest.mark.parametrize(("ranks", "workers"), [(1, 1), (2, 1), (4, 2), (8, 4)])
def test_every_sample_goes_to_one_reader(shards: int, ranks: int, workers: int) -> None:
    """Each (shard, sample) is kept by exactly one (rank, loader worker); with as many shards
    as ranks, a rank opens only its own shards (not every shard's bytes)."""
    urls = [f"shard-{i:02d}.tar" for i in range(shards)]
    kept: list[tuple[str, int]] = []
    for r in range(ranks):
        opened: set[str] = set()
        for w in range(workers):
            mine, part, parts = split_shards(urls, (r, ranks), (w, workers))
            opened.update(mine)
            positions = [(u, j) for u in mine for j in range(5)]  # 5 samples a shard
            kept += [sample for i, sample in enumerate(positions) if i % parts == part]
        if shards >= ranks:
            assert opened == set(urls[r::ranks])
    assert sorted(kept) == sorted((u, j) for u in urls for j in range(5))
