"""Building WebDataset shards from datasets on disk, resuming builds, and verifying shards."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cbtlab.data import eval_batches, read_split
from cbtlab.data.build import (
    BuildError,
    Encoding,
    UndecodableImages,
    build_shards,
    plan_shards,
)
from cbtlab.data.cli import build_main, verify_main
from cbtlab.data.progress import Progress
from cbtlab.data.shards import CARD_NAME, content_hash
from cbtlab.data.sources import (
    CifarSource,
    Flowers102Source,
    ImageFolderSource,
    PetsSource,
    SourceError,
    open_source,
)
from cbtlab.data.verify import verify_shards
from faults import DISK_GONE, fail_read_number

CLASSES = ("cat", "dog", "fish")


def _image(seed: int, size: tuple[int, int] = (12, 10), fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _imagefolder(root: Path, train: int = 5, val: int = 2) -> Path:
    """train/<class>/ and val/<class>/ of small JPEGs (ImageNet-style `.JPEG` names)."""
    n = 0
    for split, count in (("train", train), ("val", val)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                n += 1
                (folder / f"{c}_{i}.JPEG").write_bytes(_image(n, (12 + i, 10)))
    return root


def _tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


def _build(source, out: Path, **kw):
    return build_shards(source, out, samples_per_shard=4, local=True, progress=False, **kw)


def test_imagefolder_build_holds_every_sample_once(tmp_path: Path) -> None:
    data = _imagefolder(tmp_path / "in")
    out = tmp_path / "out"
    result = _build(ImageFolderSource(data), out)
    assert result.num_samples == {"train": 15, "val": 6}
    assert sorted(result.written) == sorted(_tars(out)) and not result.skipped
    assert verify_shards(out).ok

    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.column_names == [
        "key", "label", "class_name", "split", "shard", "size", "sha256"
    ]  # fmt: skip
    rows = manifest.to_pylist()
    assert len({r["key"] for r in rows}) == len(rows) == 21
    # Every source file is in the shards once, with its original bytes and its folder's label.
    by_sha = {r["sha256"]: r for r in rows}
    for path in data.rglob("*.JPEG"):
        row = by_sha[hashlib.sha256(path.read_bytes()).hexdigest()]
        split, class_name = path.parts[-3], path.parts[-2]
        assert (row["split"], row["class_name"]) == (split, class_name)
        assert row["label"] == CLASSES.index(class_name)
    for shard, content in _tars(out).items():
        with tarfile.open(fileobj=io.BytesIO(content)) as tar:
            names = tar.getnames()
        keys = [r["key"] for r in rows if r["shard"] == shard]
        assert sorted(names) == sorted([f"{k}.cls" for k in keys] + [f"{k}.jpg" for k in keys])

    card = json.loads((out / "card.json").read_text())
    assert card["class_names"] == list(CLASSES) and card["num_classes"] == 3
    assert card["num_samples"] == {"train": 15, "val": 6}
    assert card["class_counts"] == {"train": [5, 5, 5], "val": [2, 2, 2]}
    assert [s["num_samples"] for s in card["splits"]["train"]] == [4, 4, 4, 3]
    assert card["content_hash"] == content_hash(manifest)
    assert card["image_ext"] == "jpg" and len(card["extra"]["mean"]) == 3
    # The training order is shuffled with the seed; other splits keep the source order.
    train_keys = [r["key"] for r in rows if r["split"] == "train"]
    assert train_keys != sorted(train_keys)
    assert [r["key"] for r in rows if r["split"] == "val"] == sorted(
        r["key"] for r in rows if r["split"] == "val"
    )
    # The platform's reader and loader take the result as they take the digits.
    val = read_split(out, "val")
    labels = torch.cat(
        [y for _, y in eval_batches(val, rank=0, world_size=1, batch_size=4, transform=_zeros)]
    )
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def _zeros(image: Image.Image) -> torch.Tensor:
    assert image.mode == "RGB"
    return torch.zeros(1)


def test_plan_is_deterministic_and_respects_both_limits(tmp_path: Path) -> None:
    source = ImageFolderSource(_imagefolder(tmp_path / "in", train=8))
    records = source.records()
    first = plan_shards(records, samples_per_shard=5, seed=3)
    assert first == plan_shards(records, samples_per_shard=5, seed=3)
    assert first != plan_shards(records, samples_per_shard=5, seed=4)
    assert [p.num_samples for p in first if p.split == "train"] == [5, 5, 5, 5, 4]
    limit = 12 * 1024
    out = tmp_path / "out"
    _build(source, out, max_shard_bytes=limit)  # and at most 4 per shard
    sizes = [len(b) for b in _tars(out).values()]
    assert len(sizes) > 8 and max(sizes) <= limit
    assert verify_shards(out).ok
    with pytest.raises(ValueError, match="samples_per_shard"):
        plan_shards(records, samples_per_shard=None, max_shard_bytes=None)


def _damage_member(shard: Path, suffix: str) -> str:
    """Overwrite the first `suffix` member's data in place with zeros; returns its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = bytes(member.size)
    shard.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_verify_names_truncated_shards_and_corrupt_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _build(ImageFolderSource(_imagefolder(tmp_path / "in")), out)
    assert verify_main([str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out}: 21 samples in 6 shards")

    truncated = out / "train-00001.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    bad_key = _damage_member(out / "val-00000.tar", ".jpg")
    (out / "train-00003.tar").unlink()
    assert verify_main([str(out), "--quiet"]) == 1
    report = capsys.readouterr().out
    assert report.startswith(f"FAILED {out}")
    assert "train-00001.tar: truncated shard" in report
    assert "train-00001.tar: missing keys" in report
    assert f"val-00000.tar: corrupt image {bad_key}" in report
    assert f"val-00000.tar: checksum mismatch {bad_key}" in report
    assert "train-00003.tar: missing shard" in report
    assert "train-00000.tar" not in report and "train-00002.tar" not in report


def test_verify_finds_extra_keys_and_a_missing_card(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(ImageFolderSource(_imagefolder(tmp_path / "in")), out)
    shard = out / "val-00001.tar"
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("intruder.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    report = verify_shards(out)
    kinds = {(p.where, p.kind) for p in report.problems}
    assert ("val-00001.tar", "extra keys") in kinds
    assert "intruder" in report.summary()
    (out / "card.json").unlink()
    assert [p.kind for p in verify_shards(out).problems] == ["missing card"]


def _rewrite(shard: Path, order: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard, "w") as tar:
        for name, data in order:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _problems(out: Path, shard: str) -> set[tuple[str, str]]:
    return {(p.kind, p.key) for p in verify_shards(out).problems if p.where == shard}


def test_verify_reads_samples_as_a_reader_groups_them(tmp_path: Path) -> None:
    """Members apart are a split sample; each copy of a duplicated image is checked; a tar that
    breaks off inside a sample keeps the complete samples before it."""
    out = tmp_path / "out"
    _build(ImageFolderSource(_imagefolder(tmp_path / "in")), out)
    shard = out / "train-00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    (a_cls, a_img), (b_cls, b_img) = members[0:2], members[2:4]
    a, b = a_cls[0].split(".")[0], b_cls[0].split(".")[0]
    assert a_img[0].startswith(f"{a}.") and b_img[0].startswith(f"{b}.")

    _rewrite(shard, [a_img, *members[2:], a_cls])  # a's label after the other samples
    assert ("split sample", a) in _problems(out, shard.name)
    assert ("checksum mismatch", a) not in _problems(out, shard.name)

    broken = (b_img[0], b"not an image")
    _rewrite(shard, [*members[:2], b_cls, broken, b_img, *members[4:]])
    found = _problems(out, shard.name)
    assert {("duplicate member", b), ("corrupt image", b), ("checksum mismatch", b)} <= found

    _rewrite(shard, members)
    with tarfile.open(shard) as tar:
        third_image = tar.getmembers()[5]
    shard.write_bytes(shard.read_bytes()[: third_image.offset_data + 10])
    report = verify_shards(out)
    ours = [p for p in report.problems if p.where == shard.name]
    assert "the tar breaks off after 3 samples" in ours[0].detail, ours
    incomplete = [p for p in ours if p.kind == "incomplete samples"]
    assert len(incomplete) == 1 and third_image.name.split(".")[0] in incomplete[0].detail
    missing = next(p for p in ours if p.kind == "missing keys")
    assert missing.detail.startswith("1 samples of the manifest"), missing  # the fourth only


def test_interrupted_build_resumes_to_identical_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _imagefolder(tmp_path / "in")
    reference = tmp_path / "ref"
    _build(ImageFolderSource(data), reference)

    out = tmp_path / "out"
    fail_read_number(monkeypatch, 10)  # two shards of 4 are complete, the third is one sample in
    with pytest.raises(BuildError, match=rf"train-00002.tar failed: {DISK_GONE}"):
        _build(ImageFolderSource(data), out)
    monkeypatch.undo()
    assert sorted(_tars(out)) == ["train-00000.tar", "train-00001.tar"]
    assert not list(out.glob("*.tmp-*")) and not (out / "card.json").exists()
    # What a killed process leaves: a temporary file, and a shard renamed into place whose build
    # record was never written.
    (out / "train-00002.tar.tmp-1234abcd").write_bytes(b"partial")
    (out / "train-00003.tar").write_bytes(b"not finished")
    stamps = {n: (out / n).stat().st_mtime_ns for n in ("train-00000.tar", "train-00001.tar")}

    result = _build(ImageFolderSource(data), out)
    assert result.skipped == ["train-00000.tar", "train-00001.tar"]
    assert result.written == [
        "train-00002.tar",
        "train-00003.tar",
        "val-00000.tar",
        "val-00001.tar",
    ]
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert not list(out.glob("*.tmp-*"))
    assert _tars(out) == _tars(reference)
    assert (out / "card.json").read_text() == (reference / "card.json").read_text()
    assert pq.read_table(out / "manifest.parquet").equals(
        pq.read_table(reference / "manifest.parquet")
    )

    # A lost shard is rebuilt; a different seed rebuilds the training shards only.
    (out / "val-00000.tar").unlink()
    assert _build(ImageFolderSource(data), out).written == ["val-00000.tar"]
    assert _tars(out) == _tars(reference)
    reseeded = _build(ImageFolderSource(data), out, seed=1)
    assert reseeded.skipped == ["val-00000.tar", "val-00001.tar"]
    assert verify_shards(out).ok


def test_build_to_an_fsspec_url(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    data = _imagefolder(tmp_path / "in")
    url = f"memory://cbtlab-test-{uuid.uuid4().hex}/dataset"
    result = _build(ImageFolderSource(data), url)
    assert result.location == url and len(result.written) == 6
    assert verify_shards(url).ok
    local = tmp_path / "local"
    _build(ImageFolderSource(data), local)
    import fsspec

    for name, content in _tars(local).items():
        with fsspec.open(f"{url}/{name}", "rb") as f:
            assert f.read() == content
    assert len(_build(ImageFolderSource(data), url).skipped) == 6
    with pytest.raises(ValueError, match="pipe:"):
        _build(ImageFolderSource(data), "pipe:cat > x.tar")


def test_reencoding_downscales_and_writes_jpeg(tmp_path: Path) -> None:
    assert Encoding(resize=6).target_size((12, 10)) == (7, 6)
    assert Encoding(resize=6).target_size((4, 20)) == (4, 20)  # never upscaled
    out = tmp_path / "out"
    data = _imagefolder(tmp_path / "in", train=2, val=1)
    _build(ImageFolderSource(data), out, encoding=Encoding(resize=6, jpeg_quality=80))
    assert verify_shards(out).ok
    with tarfile.open(out / "val-00000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = Image.open(io.BytesIO(tar.extractfile(member).read()))
    assert image.format == "JPEG" and min(image.size) == 6
    card = json.loads((out / "card.json").read_text())
    assert card["extra"]["resize"] == 6 and card["extra"]["jpeg_quality"] == 80


def test_progress_line_and_quiet_logs() -> None:
    now = [0.0]
    stream = io.StringIO()
    meter = Progress(1000, done=100, stream=stream, interval_s=30, clock=lambda: now[0])
    now[0] = 10.0
    meter.advance(200)  # before the interval: nothing printed (not a terminal)
    assert stream.getvalue() == ""
    assert meter.line() == "images 300/1,000  20.0/s  ETA 0:00:35"
    now[0] = 31.0
    meter.advance(10)
    assert stream.getvalue().splitlines() == [meter.line()]
    meter.close()
    assert len(stream.getvalue().splitlines()) == 2


# ---- readers -------------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    # The real batches were pickled by Python 2: their keys are bytes.
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2))


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_reader_and_build(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    _pickle(root / "batches.meta", {"label_names": names})
    for i in range(1, 6):
        _pickle(root / f"data_batch_{i}", {"data": _cifar_rows(2, i), "labels": [i, i + 1]})
    test = _cifar_rows(3, 0)
    _pickle(root / "test_batch", {"data": test, "labels": [7, 8, 9]})

    source = open_source("cifar10", tmp_path)  # finds the release folder one level down
    assert isinstance(source, CifarSource) and source.root == root
    assert source.class_names == tuple(f"class{i}" for i in range(10))
    records = source.records()
    assert {s: len(r) for s, r in records.items()} == {"train": 10, "val": 3}
    assert [r.label for r in records["train"][:4]] == [1, 2, 2, 3]
    first = next(source.samples("val"))
    assert (first.label, first.class_name, first.ext) == (7, "class7", "png")
    pixels = np.asarray(Image.open(io.BytesIO(first.image)))  # (H, W, C), lossless
    assert np.array_equal(pixels, test[0].reshape(3, 32, 32).transpose(1, 2, 0))

    out = tmp_path / "out"
    argv = ["--source", "cifar10", "--input", str(root), "--output", str(out)]
    assert build_main([*argv, "--samples-per-shard", "4", "--local", "--quiet"]) == 0
    assert verify_shards(out).ok
    card = json.loads((out / "card.json").read_text())
    assert card["extra"]["image_size"] == 32 and card["num_samples"] == {"train": 10, "val": 3}


def test_cifar100_reader(tmp_path: Path) -> None:
    names = [f"fine{i}".encode() for i in range(100)]
    _pickle(tmp_path / "meta", {"fine_label_names": names, "coarse_label_names": [b"x"] * 20})
    _pickle(
        tmp_path / "train",
        {"data": _cifar_rows(4, 1), "fine_labels": [0, 99, 5, 5], "coarse_labels": [0] * 4},
    )
    _pickle(tmp_path / "test", {"data": _cifar_rows(2, 2), "fine_labels": [42, 0]})
    source = open_source("cifar100", tmp_path)
    assert source.num_classes == 100
    samples = list(source.samples("train"))
    assert [(s.label, s.class_name) for s in samples[:2]] == [(0, "fine0"), (99, "fine99")]
    assert [s.key for s in source.samples("val")] == ["val_00000", "val_00001"]
    _pickle(tmp_path / "test", {"data": _cifar_rows(1, 2), "fine_labels": [100]})
    with pytest.raises(SourceError, match="label 100 is out of range"):
        source.records()


def test_flowers102_reader(tmp_path: Path) -> None:
    from scipy.io import savemat

    (tmp_path / "jpg").mkdir()
    for i in range(1, 7):
        (tmp_path / "jpg" / f"image_{i:05d}.jpg").write_bytes(_image(i))
    savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 102, 50, 2]])})
    savemat(
        tmp_path / "setid.mat",
        {"trnid": np.array([[1, 3]]), "valid": np.array([[2, 4]]), "tstid": np.array([[5, 6]])},
    )
    source = Flowers102Source(tmp_path)
    assert source.num_classes == 102
    records = source.records()
    assert {s: [(r.key, r.label) for r in rs] for s, rs in records.items()} == {
        "train": [("image_00001", 0), ("image_00003", 1)],
        "val": [("image_00002", 0), ("image_00004", 101)],
        "test": [("image_00005", 49), ("image_00006", 1)],
    }
    sample = next(source.samples("val"))
    assert sample.image == (tmp_path / "jpg" / "image_00002.jpg").read_bytes()  # original bytes
    assert sample.class_name == source.class_names[0]
    savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 103, 50, 2]])})
    with pytest.raises(SourceError, match=r"label 103 is out of range 1..102"):
        source.records()


def test_pets_reader(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    train = ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1", "Abyssinian_2 1 1 1"]
    test = ["# comment", "american_bulldog_3 2 2 1", "Bengal_7 3 1 2"]
    for line in train + test[1:]:
        name = line.split()[0]
        (tmp_path / "images" / f"{name}.jpg").write_bytes(_image(len(name)))
    (tmp_path / "annotations" / "trainval.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    source = PetsSource(tmp_path)
    assert source.class_names == ("Abyssinian", "american_bulldog", "Bengal")
    records = source.records()
    assert [(r.key, r.label) for r in records["train"]] == [
        ("Abyssinian_1", 0), ("american_bulldog_10", 1), ("Abyssinian_2", 0)
    ]  # fmt: skip
    assert [r.label for r in records["val"]] == [1, 2]
    (tmp_path / "annotations" / "test.txt").write_text("Bengal_7 1 1 2\n")
    with pytest.raises(SourceError, match="class id 1 is 'Bengal' here but 'Abyssinian'"):
        PetsSource(tmp_path)


def _flat_val(root: Path) -> list[str]:
    _imagefolder(root, val=0)
    for c in CLASSES:
        (root / "val" / c).rmdir()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 5)]
    for i, name in enumerate(names):
        (root / "val" / name).write_bytes(_image(100 + i))
    return names


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("val.txt", "ILSVRC2012_val_00000003.JPEG 0\nILSVRC2012_val_00000001.JPEG 2\n"
         "ILSVRC2012_val_00000002.JPEG 1\nILSVRC2012_val_00000004.JPEG fish\n"),
        ("labels.txt", "fish\n1\ncat\nfish\n"),
        ("LOC_val_solution.csv", "ImageId,PredictionString\n"
         "ILSVRC2012_val_00000002,dog 1 2 3 4 dog 5 6 7 8\nILSVRC2012_val_00000001,fish 0 0 1 1\n"
         "ILSVRC2012_val_00000004,fish 1 1 2 2\nILSVRC2012_val_00000003,cat 0 0 1 1\n"),
    ],
)  # fmt: skip
def test_flat_imagenet_val_with_a_label_file(tmp_path: Path, file: str, text: str) -> None:
    names = _flat_val(tmp_path / "in")
    labels = tmp_path / file
    labels.write_text(text)
    source = open_source("imagefolder", tmp_path / "in", val_labels=labels)
    val = source.records()["val"]
    assert [(r.key, r.label) for r in val] == [
        (Path(n).stem, y) for n, y in zip(names, [2, 1, 0, 2], strict=True)
    ]
    assert len(source.records()["train"]) == 15


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"input folder .*nowhere does not exist"):
        ImageFolderSource(tmp_path / "nowhere")
    data = _imagefolder(tmp_path / "in")
    (data / "train" / "eel").mkdir()
    with pytest.raises(SourceError, match=r"class folder .*eel holds no images"):
        ImageFolderSource(data).records()
    (data / "train" / "eel").rmdir()

    names = _flat_val(tmp_path / "flat")
    labels = tmp_path / "val.txt"
    with pytest.raises(SourceError, match=r"label file .*val.txt is missing"):
        open_source("imagefolder", tmp_path / "flat", val_labels=labels)
    labels.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(SourceError, match="cannot read the label file"):
        ImageFolderSource(tmp_path / "flat", val_labels=labels).records()
    labels.write_text("".join(f"{n} 3\n" for n in names))
    with pytest.raises(SourceError, match=r"label 3 at line 1 of .* out of range 0..2"):
        ImageFolderSource(tmp_path / "flat", val_labels=labels).records()
    labels.write_text("".join(f"{n} whale\n" for n in names))
    with pytest.raises(SourceError, match=r"'whale' .* is not a class folder name"):
        ImageFolderSource(tmp_path / "flat", val_labels=labels).records()
    labels.write_text("".join(f"{n} cat\n" for n in names[:3]))
    with pytest.raises(SourceError, match="1 images have no label"):
        ImageFolderSource(tmp_path / "flat", val_labels=labels).records()
    with pytest.raises(SourceError, match="pass --val-labels"):
        ImageFolderSource(tmp_path / "flat").records()

    (data / "train" / "cat" / "odd.png").write_bytes(_image(0, fmt="PNG"))
    with pytest.raises(SourceError, match=r"several types \(jpg, png\)"):
        _build(ImageFolderSource(data), tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--source", "pets", "--input", str(tmp_path / "nowhere"), "--output", "x"])
    assert exit_info.value.code == 2


def _spoil(data: Path) -> dict[str, str]:
    """Three images of the folder made undecodable, in different shards and splits."""
    truncated = data / "train" / "cat" / "cat_1.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (data / "train" / "fish" / "fish_4.JPEG").write_bytes(b"not an image at all")
    (data / "val" / "dog" / "dog_0.JPEG").write_bytes(b"")
    return {
        "train/cat/cat_1.JPEG": "OSError: Truncated File Read",
        "train/fish/fish_4.JPEG": "UnidentifiedImageError: cannot identify image file",
        "val/dog/dog_0.JPEG": "UnidentifiedImageError: cannot identify image file",
    }


def test_undecodable_images_are_all_listed_and_stop_the_build(tmp_path: Path) -> None:
    data = _imagefolder(tmp_path / "in")
    bad = _spoil(data)
    with pytest.raises(UndecodableImages) as stop:
        _build(ImageFolderSource(data), tmp_path / "out")
    assert [ref for ref, _ in stop.value.images] == sorted(bad)
    for ref, reason in stop.value.images:
        assert reason.startswith(bad[ref]), ref
        assert f"  {ref}: {bad[ref]}" in str(stop.value)
    assert "--skip-bad" in str(stop.value)
    # No card (the dataset is not complete); the shards without a bad image are kept.
    assert not (tmp_path / "out" / "card.json").exists()
    written = _tars(tmp_path / "out")
    assert 0 < len(written) < 6


def test_skip_bad_leaves_them_out_and_lists_them_in_the_card(tmp_path: Path, capsys) -> None:
    data = _imagefolder(tmp_path / "in")
    bad = _spoil(data)
    flags = ["--source", "imagefolder", "--input", str(data), "--output", str(tmp_path / "out")]
    flags += ["--samples-per-shard", "4", "--local", "--quiet"]
    assert build_main(flags) == 1
    err = capsys.readouterr().err
    assert all(f"  {ref}: {reason}" in err for ref, reason in bad.items())
    assert "Traceback" not in err

    assert build_main([*flags, "--skip-bad"]) == 0
    assert "left out 3 images that do not decode" in capsys.readouterr().out
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    skipped = card["extra"]["skipped_images"]
    assert [s["file"] for s in skipped] == sorted(bad)
    assert all(s["error"].startswith(bad[s["file"]]) for s in skipped)
    assert card["num_samples"] == {"train": 13, "val": 5}
    keys = set(pq.read_table(tmp_path / "out" / "manifest.parquet").column("key").to_pylist())
    assert len(keys) == 18 and not {"train_cat_cat_1", "train_fish_fish_4"} & keys
    assert verify_shards(tmp_path / "out").ok
    # A build that does not skip them does not take the shards that left them out.
    with pytest.raises(UndecodableImages):
        _build(ImageFolderSource(data), tmp_path / "out")


@pytest.mark.ray
def test_ray_fan_out_writes_the_same_shards(tmp_path: Path, ray_session: None) -> None:
    data = _imagefolder(tmp_path / "in", train=3, val=1)
    _build(ImageFolderSource(data), tmp_path / "local")
    result = build_shards(
        ImageFolderSource(data), tmp_path / "ray", samples_per_shard=4, progress=False
    )
    assert len(result.written) == 4
    assert _tars(tmp_path / "ray") == _tars(tmp_path / "local")
    assert verify_shards(tmp_path / "ray").ok


def test_a_process_pool_writes_the_same_shards(tmp_path: Path) -> None:
    data = _imagefolder(tmp_path / "in", train=3, val=1)
    _build(ImageFolderSource(data), tmp_path / "local")
    result = build_shards(
        ImageFolderSource(data), tmp_path / "pool", samples_per_shard=4, local=True, workers=3,
        progress=False,
    )  # fmt: skip
    assert len(result.written) == 4
    assert _tars(tmp_path / "pool") == _tars(tmp_path / "local")
    cards = [(tmp_path / out / CARD_NAME).read_bytes() for out in ("pool", "local")]
    assert cards[0] == cards[1]
    with pytest.raises(ValueError, match="workers must be at least 1"):
        build_shards(ImageFolderSource(data), tmp_path / "x", local=True, workers=0)
