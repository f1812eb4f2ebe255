"""Shards on S3: building, resuming and verifying into s3://, training reads with read-ahead of
the next shard, and the errors of a missing bucket, object or package and of wrong credentials.

Everything runs against moto's S3-compatible server on 127.0.0.1 (tests/services.py), reached
the way a user reaches MinIO or Ceph: AWS_ENDPOINT_URL and the credentials in the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbtlab.data import TrainEpoch, eval_batches, open_split, remote
from cbtlab.data.checksums import ChecksumError
from cbtlab.data.cli import build_main, verify_main
from cbtlab.data.loader import ShardReadError, _read_shard, _read_shards
from cbtlab.data.segmentation import MASK_KEY, write_shapes_layout
from cbtlab.data.shards import ShardInfo, ShardSet
from faults import DISK_GONE, fail_read_number
from services import S3, s3_server
from test_build_shards import _damage_member, _imagefolder, _tars

s3fs = pytest.importorskip("s3fs")

BUCKET = "cbtlab-data"
PIPELINES = Path(__file__).resolve().parents[1] / "data_pipelines"
READ_AHEAD = "cbtlab-read-ahead"  # the name of every read-ahead thread starts so


@dataclass(frozen=True)
class Dataset:
    input: Path  # the ImageFolder
    url: str  # its shards on the S3 server
    local: Path  # the same shards built into a local folder


def _fresh_clients() -> None:
    """s3fs caches its clients by their arguments, not by the environment they were made in."""
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3, Path]]:
    """The S3 server with BUCKET, named by this module's environment; and the server's log."""
    folder = tmp_path_factory.mktemp("moto")
    with s3_server(folder, [BUCKET]) as s3, pytest.MonkeyPatch.context() as env:
        for name, value in s3.env().items():
            env.setenv(name, value)
        _fresh_clients()
        yield s3, folder / "moto.log"
    _fresh_clients()


def _argv(data: Path, output: str | Path) -> list[str]:
    return [
        "--source", "imagefolder", "--input", str(data), "--output", str(output),
        "--samples-per-shard", "4", "--local", "--quiet",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(server: tuple[S3, Path], tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    folder = tmp_path_factory.mktemp("s3_dataset")
    data = _imagefolder(folder / "in")
    built = Dataset(data, f"s3://{BUCKET}/dataset", folder / "local")
    assert build_main(_argv(data, built.url)) == 0
    assert build_main(_argv(data, built.local)) == 0
    return built


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run data_pipelines/`name` as a user does (the S3 server named by the environment)."""
    return subprocess.run(
        [sys.executable, str(PIPELINES / name), *args], capture_output=True, text=True, timeout=120
    )


def _requests(log: Path, method: str, path: str) -> int:
    """How many `method` requests for `path` the S3 server has logged."""
    return log.read_text().count(f"{method} {path} HTTP/1.1")  # in colour when not 200


def _wait_for(check: Callable[[], object], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout_s} s"
        time.sleep(0.02)


def test_build_to_s3_resumes_and_verify_catches_a_corrupted_object(
    server: tuple[S3, Path],
    dataset: Dataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3, log = server
    url = f"s3://{BUCKET}/resumed"
    fail_read_number(monkeypatch, 10)  # two shards of 4 are uploaded, the third is one sample in
    assert build_main(_argv(dataset.input, url)) == 1
    assert f"train-00002.tar failed: {DISK_GONE}" in capsys.readouterr().err
    monkeypatch.undo()
    resumed = _script("build_shards.py", *_argv(dataset.input, url))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{url}: 4 shards written, 2 already complete" in resumed.stdout
    for done in ("train-00000.tar", "train-00001.tar"):  # uploaded before the crash only
        assert _requests(log, "PUT", f"/{BUCKET}/resumed/{done}") == 1
    client = s3.client()
    for name, content in _tars(dataset.local).items():  # the bytes of a local build
        assert client.get_object(Bucket=BUCKET, Key=f"resumed/{name}")["Body"].read() == content

    assert verify_main([url, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {url}: 21 samples in 6 shards")
    shard = tmp_path / "val-00000.tar"
    shard.write_bytes(client.get_object(Bucket=BUCKET, Key="resumed/val-00000.tar")["Body"].read())
    bad_key = _damage_member(shard, ".jpg")
    client.put_object(Bucket=BUCKET, Key="resumed/val-00000.tar", Body=shard.read_bytes())
    checked = _script("verify_shards.py", url, "--quiet")
    assert checked.returncode == 1, checked.stderr
    report = checked.stdout
    assert report.startswith(f"FAILED {url}")
    assert f"val-00000.tar: corrupt image {bad_key}" in report
    assert f"val-00000.tar: checksum mismatch {bad_key}" in report
    # The loader reads the manifest's rows of the shard from S3 as well, and stops on them.
    val = open_split(url, "val")
    with pytest.raises(ChecksumError, match=f"{bad_key} of shard {url}/val-00000.tar"):
        _batches(
            eval_batches(
                val, rank=0, world_size=1, batch_size=2, transform=_pixels, checksums="stop"
            )
        )


def test_ade20k_builds_into_s3_with_its_masks_verified(
    server: tuple[S3, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`build_shards.py --source ade20k` writes image + mask shards to S3 (as Ray tasks without
    --local; here in two processes), which verify reads mask and all; resizing is refused."""
    layout = write_shapes_layout(tmp_path / "ade", num_train=5, num_val=2, size=24)
    url = f"s3://{BUCKET}/ade"
    argv = ["--source", "ade20k", "--input", str(layout.parent), "--output", url,
            "--samples-per-shard", "2", "--local", "--workers", "2", "--quiet"]  # fmt: skip
    assert build_main(argv) == 0
    assert f"{url}: 4 shards written, 0 already complete; train 5, val 2 samples" in (
        capsys.readouterr().out
    )
    assert verify_main([url, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {url}: 7 samples in 4 shards")
    val = open_split(url, "val")
    assert val.extra["members"] == [MASK_KEY] and val.num_classes == 150
    with pytest.raises(SystemExit):
        build_main([*argv, "--resize", "16"])
    assert "cannot resize the images alone" in capsys.readouterr().err


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32).copy())


def _batches(epoch: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> list[list[float]]:
    return [[*images.flatten().tolist(), *labels.tolist()] for images, labels in epoch]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_split_on_s3_streams_the_same_samples_as_a_local_copy(
    dataset: Dataset, workers: int
) -> None:
    on_s3, local = open_split(dataset.url, "train"), open_split(dataset.local, "train")
    assert on_s3.shards[0].path == f"{dataset.url}/train-00000.tar"
    assert on_s3.manifest == f"{dataset.url}/manifest.parquet"
    assert dataclasses.replace(on_s3, shards=local.shards, manifest=local.manifest) == local

    def train(shardset: ShardSet) -> list[list[float]]:
        epoch = TrainEpoch(
            shardset, rank=0, world_size=1, epoch=1, seed=3, batch_size=2, shuffle_buffer=4,
            transform=_pixels, loader_workers=workers,
        )  # fmt: skip
        return _batches(epoch)

    def evaluate(shardset: ShardSet) -> list[list[float]]:
        epoch = eval_batches(
            shardset, rank=0, world_size=1, batch_size=2, transform=_pixels,
            loader_workers=workers,
        )  # fmt: skip
        return _batches(epoch)

    assert len(train(on_s3)) == 7 and train(on_s3) == train(local)
    on_s3_val = open_split(dataset.url, "val")
    assert evaluate(on_s3_val) == evaluate(open_split(dataset.local, "val"))


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(shard name, thread name) of every shard opened from now on."""
    opened: list[tuple[str, str]] = []
    open_url = remote.open_url

    def recording(url: str):
        opened.append((url.rsplit("/", 1)[-1], threading.current_thread().name))
        return open_url(url)

    monkeypatch.setattr(remote, "open_url", recording)
    return opened


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(READ_AHEAD)]


def test_the_next_shard_downloads_while_the_current_one_streams(
    server: tuple[S3, Path], dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, log = server
    shards = open_split(dataset.url, "train").shards
    next_shard = f"/{BUCKET}/dataset/train-00001.tar"
    gets = _requests(log, "GET", next_shard)  # earlier tests' reads
    opened = _record_opens(monkeypatch)
    samples = _read_shards(shards)
    first = next(samples)
    assert first["__url__"] == shards[0].path
    # Shard 0 is one sample in: shard 1 is fetched by a read-ahead thread meanwhile.
    _wait_for(lambda: _requests(log, "GET", next_shard) > gets, "the next shard's download")
    assert dict(opened)["train-00001.tar"].startswith(READ_AHEAD)
    rest = list(samples)
    # Every shard but the first was opened once, ahead, and read from its downloaded copy.
    assert sorted(name for name, _ in opened) == [Path(s.path).name for s in shards]
    by = dict(opened)
    assert by.pop("train-00000.tar") == threading.current_thread().name
    assert all(thread.startswith(READ_AHEAD) for thread in by.values())
    assert _requests(log, "GET", next_shard) == gets + 1
    local = list(_read_shards(open_split(dataset.local, "train").shards))
    assert [(s["__key__"], s["jpg"], s["cls"]) for s in [first, *rest]] == [
        (s["__key__"], s["jpg"], s["cls"]) for s in local
    ]
    assert not _read_ahead_threads()

    # Local shards keep the kernel's read-ahead: no thread, no copy.
    local_shards = open_split(dataset.local, "train").shards
    opened.clear()
    assert len(list(_read_shards(local_shards))) == 15
    assert all(not thread.startswith(READ_AHEAD) for _, thread in opened)


def _spooled_files(folder: Path) -> list[str]:
    """The files in `folder` this process holds open (a temporary file has no name left)."""
    fds = Path("/proc/self/fd")
    links = []
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            links.append(os.readlink(fds / fd))
    return [link for link in links if link.startswith(str(folder))]


class _SlowStream:
    """A download that slows down after its first `fast` bytes (a slow network)."""

    def __init__(self, stream, fast: int) -> None:
        self.stream, self.fast, self.read_bytes, self.closed = stream, fast, 0, False

    def read(self, size: int) -> bytes:
        if self.read_bytes >= self.fast:
            time.sleep(0.2)
        data = self.stream.read(size)
        self.read_bytes += len(data)
        return data

    def close(self) -> None:
        self.closed = True
        self.stream.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_stream_closed_early_leaves_no_download_behind(
    dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(remote.tempfile, "tempdir", str(spool))
    monkeypatch.setattr(remote, "READ_AHEAD_MEMORY", 1024)  # smaller than a shard: to disk
    monkeypatch.setattr(remote, "READ_AHEAD_CHUNK", 512)
    shards = open_split(dataset.url, "train").shards
    downloads: list[_SlowStream] = []
    open_url = remote.open_url

    def slow_download(url: str):
        if not threading.current_thread().name.startswith(READ_AHEAD):
            return open_url(url)
        downloads.append(_SlowStream(open_url(url), fast=2048))
        return downloads[-1]

    monkeypatch.setattr(remote, "open_url", slow_download)
    samples = _read_shards(shards)
    next(samples)
    _wait_for(lambda: _spooled_files(spool), "the spill of the next shard to disk")
    assert len(_read_ahead_threads()) == 1  # still downloading: seconds to go
    samples.close()  # e.g. an epoch's quota reached in the middle of a shard
    assert not _read_ahead_threads() and not _spooled_files(spool)
    assert downloads[0].closed and downloads[0].read_bytes < shards[1].num_bytes


def test_a_failed_download_raises_what_reading_would(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = open_split(dataset.url, "train").shards
    missing = dataclasses.replace(shards[1], path=f"s3://{BUCKET}/dataset/train-99999.tar")
    with pytest.raises(ShardReadError) as read:
        list(_read_shard(missing))
    opened = _record_opens(monkeypatch)
    with pytest.raises(ShardReadError) as read_ahead:
        list(_read_shards([shards[0], missing]))
    assert dict(opened)["train-99999.tar"].startswith(READ_AHEAD)
    assert str(read_ahead.value) == str(read.value)
    assert str(read.value) == (
        f"cannot open shard {missing.path}: no such object in bucket {BUCKET!r} at "
        f"{os.environ['AWS_ENDPOINT_URL']}"
    )
    assert not _read_ahead_threads()


def test_a_missing_bucket_or_dataset_is_named(
    server: tuple[S3, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    s3, _ = server
    with pytest.raises(FileNotFoundError) as no_bucket:
        open_split("s3://no-such-bucket/dataset", "train")
    assert str(no_bucket.value) == (
        "cannot read the dataset card s3://no-such-bucket/dataset/card.json: there is no bucket "
        f"'no-such-bucket' at {s3.endpoint}"
    )
    with pytest.raises(FileNotFoundError, match=r"nowhere/card\.json: no such object in bucket"):
        open_split(f"s3://{BUCKET}/nowhere", "train")
    assert verify_main(["s3://no-such-bucket/dataset", "--quiet"]) == 1
    assert "missing card: no card: the build is incomplete, or nothing was built" in (
        capsys.readouterr().out
    )


def test_wrong_credentials_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server that checks credentials after its first request (the bucket's creation): moto
    # knows no user, so every key is wrong.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    with s3_server(tmp_path / "moto", [BUCKET]) as s3:
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        _fresh_clients()
        try:
            url = f"s3://{BUCKET}/dataset"
            with pytest.raises(PermissionError, match=r"card\.json: access denied at http"):
                open_split(url, "train")
            shard = ShardInfo(f"{url}/train-00000.tar", 4, 0)
            with pytest.raises(ShardReadError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS"):
                list(_read_shard(shard))
            assert verify_main([url, "--quiet"]) == 1
            assert f"cannot read {url}: access denied at" in capsys.readouterr().err
        finally:
            _fresh_clients()


def test_without_s3fs_the_error_says_what_to_install(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = sys.modules["fsspec.registry"]._registry  # the filesystems fsspec has imported
    monkeypatch.delitem(registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails
    install = re.escape("pip install 'cbtlab[s3]'")
    with pytest.raises(ImportError, match=rf"s3:// filesystem: {install}"):
        open_split(dataset.url, "train")
    with pytest.raises(ShardReadError, match=rf"train-00000.tar: .*{install}"):
        list(_read_shard(ShardInfo(f"{dataset.url}/train-00000.tar", 4, 0)))
    with pytest.raises(SystemExit):
        build_main(_argv(dataset.input, f"s3://{BUCKET}/elsewhere"))
    assert re.search(install, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        verify_main([dataset.url])
    assert re.search(install, capsys.readouterr().err)
