"""Opening a dataset card and its shards from a local folder or a URL.

`shards.read_split` reads local folders (and checks every shard's size); a root that is a URL is
read here: its `card.json` is fetched and its shards are named `<root>/<path in the card>`.
- "pipe:" commands go through webdataset; "{}" in the command stands for the file name, e.g.
  `pipe:aws s3 cp s3://bucket/imagenet/{} -`;
- http(s), gs, ais and the other schemes webdataset opens itself (with curl, gsutil, ...);
- any other scheme (s3://, gcs://, hf://, memory://, ...) through fsspec, when it is installed
  with the filesystem's package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen, gopen_schemes

from cbtlab.data.shards import CARD_NAME, ShardInfo, ShardSet, read_split


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
    try:
        import fsspec
    except ImportError:
        raise OSError(
            f"cannot open {url}: the {scheme}:// scheme needs fsspec (pip install fsspec and the "
            "filesystem's package, e.g. s3fs)"
        ) from None
    return fsspec.open(url, "rb").open()


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
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read the dataset card {card_url}: {exc}") from exc
    if split not in card["splits"]:
        raise KeyError(f"split {split!r} not in {card_url}; has {sorted(card['splits'])}")
    shards = tuple(
        ShardInfo(join_url(root, entry["path"]), entry["num_samples"], entry["num_bytes"])
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
    )
