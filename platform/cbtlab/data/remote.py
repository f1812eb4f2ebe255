"""Opening a dataset card and its shards from a local folder or a URL.

`shards.read_split` reads local folders (and checks every shard's size); a root that is a URL is
read here: its `card.json` is fetched and its shards are named `<root>/<path in the card>`.
- "pipe:" commands go through webdataset; "{}" in the command stands for the file name, e.g.
  `pipe:aws s3 cp s3://bucket/imagenet/{} -`;
- http(s), gs, ais and the other schemes webdataset opens itself (with curl, gsutil, ...);
- any other scheme (s3://, gcs://, hf://, memory://, ...) through fsspec, when it is installed
  with the filesystem's package (s3://: `pip install 'cbtlab[s3]'`; S3-compatible stores such
  as MinIO or Ceph are named by AWS_ENDPOINT_URL).

Read-ahead (`ReadAhead`): while a stream reads one shard, the next is read ahead. A local file
is handed to the kernel's read-ahead (`prefetch`); anything else is downloaded by a thread into
a spooled temporary file, in memory up to `READ_AHEAD_MEMORY` and on the local disk (TMPDIR)
beyond, so that shards of hundreds of MB never sit in RAM, and opening that shard takes the
copy. A failed download raises, when its shard is opened, what opening it would have raised.
Closing the read-ahead (a stream stopped early) stops its download and drops the copy; the
temporary file has no name on disk, so not even a killed process leaves it behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen, gopen_schemes

from cbtlab.data.shards import CARD_NAME, MANIFEST_NAME, ShardInfo, ShardSet, read_split
from cbtlab.data.storage import url_filesystem

# A shard read ahead stays in memory up to this size, the rest spills to a temporary file.
READ_AHEAD_MEMORY = 32 * 2**20
# The download copies this much at a time and looks, between copies, whether it was stopped.
READ_AHEAD_CHUNK = 2**20


def is_url(root: str | Path) -> bool:
    """Whether `root` names a URL or a pipe rather than a local path."""
    text = str(root)
    return text.startswith("pipe:") or "://" in text


def join_url(root: str, name: str) -> str:
    """The URL of the file `name` under `root` ("{}" in `root` is replaced by the name)."""
    if "{}" in root:
        return root.replace("{}", name)
    return f"{root.rstrip('/')}/{name}"


def _local_path(url: str) -> str | None:
    """The file a local path or a file:// URL names; None for pipes and remote URLs."""
    if not is_url(url):
        return url
    if not url.startswith("pipe:") and urlparse(url).scheme == "file":
        return url2pathname(urlparse(url).path)
    return None


def open_url(url: str) -> IO[bytes]:
    """Open a local path, a file:// URL, a pipe or a remote URL for binary reading."""
    path = _local_path(url)
    if path is not None:
        return open(path, "rb")
    scheme = urlparse(url).scheme if not url.startswith("pipe:") else "pipe"
    if scheme in gopen_schemes:
        return gopen(url, "rb")
    fs, path = url_filesystem(url)
    return fs.open(path, "rb")


def close_early(stream: IO[bytes]) -> None:
    """Close a stream not read to its end: a pipe's command is killed, not awaited, and what
    closing raises is of no interest."""
    proc = getattr(stream, "proc", None)
    if proc is not None:
        proc.kill()
    with contextlib.suppress(Exception):
        stream.close()


def explain(url: str, exc: BaseException) -> str:
    """Why using `url` failed, in words that say what to check: S3's own errors name neither
    the bucket, nor the endpoint, nor the credentials."""
    parts = urlparse(url)
    if parts.scheme not in ("s3", "s3a") or not isinstance(exc, OSError):
        return str(exc) or repr(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    at = f" at {endpoint}" if endpoint else ""
    if isinstance(exc, PermissionError):
        return (
            f"access denied{at} ({exc}): check the credentials (AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and what they may do in bucket "
            f"{parts.netloc!r}; S3 also denies a missing object to credentials that may not "
            "list the bucket"
        )
    if isinstance(exc, FileNotFoundError):
        if "bucket" in str(exc).lower():
            return f"there is no bucket {parts.netloc!r}{at}"
        return f"no such object in bucket {parts.netloc!r}{at}"
    return str(exc) or repr(exc)


def prefetch(url: str) -> None:
    """Have the kernel start reading a local shard into the page cache, in the background, so
    that a stream moving on to it does not wait for the disk; nothing for URLs, or where the
    platform has no `posix_fadvise`."""
    path = _local_path(url)
    if path is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # reading it will name the problem
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class _Download:
    """One remote file copied by a thread into a spooled temporary file."""

    def __init__(self, url: str, memory: int) -> None:
        self.url = url
        # Handed to the reader (or closed by `stop`), so no `with`.
        self.copy = tempfile.SpooledTemporaryFile(max_size=memory)  # noqa: SIM115
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"cbtlab-read-ahead {url}")
        self.thread.daemon = True  # an exiting process does not wait for a download
        self.thread.start()

    def _run(self) -> None:
        try:
            source = open_url(self.url)
            finished = False
            try:
                while not self.stopped.is_set():
                    chunk = source.read(READ_AHEAD_CHUNK)
                    if not chunk:
                        finished = True
                        break
                    self.copy.write(chunk)
            finally:
                if finished:
                    source.close()  # a pipe reports its command's exit status here
                else:
                    close_early(source)
        except BaseException as exc:  # raised by `result`, in the reading thread
            self.error = exc

    def result(self) -> IO[bytes]:
        """The downloaded copy, from its start, once the download is done; or what it raised."""
        self.thread.join()
        if self.error is not None:
            self.copy.close()
            raise self.error
        self.copy.seek(0)
        return self.copy

    def stop(self) -> None:
        """Stop the download (within one chunk) and drop the copy."""
        self.stopped.set()
        self.thread.join()
        self.copy.close()


class ReadAhead:
    """The next shard of a stream, read ahead while the current one is read (see the module
    docstring): `open(url, then=next_url)` opens a file, from its downloaded copy when it was
    read ahead, and starts reading the next ahead (`start` does the latter alone); `close()` (or
    leaving a `with` block) stops a download not opened.
    `memory`: the bytes of a download kept in memory, beyond which it spills to disk."""

    def __init__(self, memory: int | None = None) -> None:
        self.memory = READ_AHEAD_MEMORY if memory is None else memory
        self.pending: _Download | None = None

    def start(self, url: str) -> None:
        if _local_path(url) is not None:
            prefetch(url)
            return
        self.close()  # one shard ahead at most
        self.pending = _Download(url, self.memory)

    def open(self, url: str, *, then: str | None = None) -> IO[bytes]:
        """`url`, from its downloaded copy when it was read ahead; `then` (the file to be read
        after it) starts being read ahead."""
        if self.pending is not None and self.pending.url == url:
            pending, self.pending = self.pending, None
            stream = pending.result()
        else:
            stream = open_url(url)
        if then is not None:
            self.start(then)
        return stream

    def close(self) -> None:
        if self.pending is not None:
            self.pending.stop()
            self.pending = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_split(root: str | Path, split: str) -> ShardSet:
    """The shards of `split` from the card at `root`, a local folder or a URL.

    A local folder goes through `shards.read_split` (every shard checked on disk); for a URL
    only the card is read here, and a shard that cannot be read fails when it is streamed."""
    if not is_url(root):
        return read_split(Path(root).expanduser(), split)
    root = str(root)
    card_url = join_url(root, CARD_NAME)
    try:
        with open_url(card_url) as stream:
            card = json.loads(stream.read())
    except PermissionError as exc:
        raise PermissionError(
            f"cannot read the dataset card {card_url}: {explain(card_url, exc)}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"cannot read the dataset card {card_url}: {explain(card_url, exc)}"
        ) from exc
    if split not in card["splits"]:
        raise KeyError(f"split {split!r} not in {card_url}; has {sorted(card['splits'])}")
    shards = tuple(
        ShardInfo(
            join_url(root, entry["path"]), entry["num_samples"], entry["num_bytes"], entry["path"]
        )
        for entry in card["splits"][split]
    )
    return ShardSet(
        name=card["name"],
        split=split,
        shards=shards,
        num_classes=card["num_classes"],
        image_ext=card["image_ext"],
        content_hash=card["content_hash"],
        extra=card.get("extra", {}),
        # Not looked for here (a request); a stream that finds none says so (checksums.py).
        manifest=join_url(root, MANIFEST_NAME),
    )
