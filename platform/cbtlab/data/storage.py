"""Where a dataset's files go: a local folder, or a URL that fsspec can write (s3://, gs://, ...).

Both kinds take whole files only. A local file is written next to its final name as
`name.tmp-<random>` and renamed into place (atomic on one filesystem). For a URL the file is
written to a local temporary file and then uploaded; an object store makes an upload visible
whole or not at all, and the builder records a shard as done only after its upload returned, so
a half-uploaded shard is rebuilt. Tests use fsspec's `memory://` and `file://`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

# What to install for a scheme whose fsspec filesystem comes with one of cbtlab's extras.
INSTALL_HINTS = {"s3": "pip install 'cbtlab[s3]'", "s3a": "pip install 'cbtlab[s3]'"}


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def url_filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for `url`, and the path in it; when fsspec or the scheme's package
    (s3fs for s3://) is missing, an ImportError that says what to install."""
    scheme = url.partition("://")[0]
    hint = INSTALL_HINTS.get(
        scheme, f"pip install fsspec and the package of its {scheme}:// filesystem (gcsfs, ...)"
    )
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(f"{url} needs the {scheme}:// filesystem: {hint} ({exc})") from None


class Storage(ABC):
    """A dataset folder: whole files by name (names may hold one level of subfolder)."""

    location: str

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The file's size in bytes, None when it does not exist."""

    @abstractmethod
    def open_read(self, name: str) -> IO[bytes]: ...

    @abstractmethod
    def temp_path(self, name: str) -> Path:
        """A fresh local path to write `name` to before `commit`."""

    @abstractmethod
    def commit(self, temp: Path, name: str) -> None:
        """Move the finished temporary file `temp` to `name`, replacing what is there."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete the file if it exists."""

    @abstractmethod
    def clean_temp(self, name: str) -> None:
        """Remove temporary files of `name` that an interrupted write left behind."""

    def url(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def read_bytes(self, name: str) -> bytes | None:
        if self.size(name) is None:
            return None
        with self.open_read(name) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        temp = self.temp_path(name)
        temp.write_bytes(data)
        self.commit(temp, name)


class LocalStorage(Storage):
    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def size(self, name: str) -> int | None:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def open_read(self, name: str) -> IO[bytes]:
        return open(self.root / name, "rb")

    def temp_path(self, name: str) -> Path:
        path = self.root / f"{name}.tmp-{secrets.token_hex(4)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, temp: Path, name: str) -> None:
        os.replace(temp, self.root / name)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def clean_temp(self, name: str) -> None:
        target = self.root / name
        for leftover in target.parent.glob(f"{target.name}.tmp-*"):
            leftover.unlink(missing_ok=True)


class FsspecStorage(Storage):
    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.base = url_filesystem(self.location)

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self._path(name)))
        except FileNotFoundError:
            return None

    def open_read(self, name: str) -> IO[bytes]:
        return self.fs.open(self._path(name), "rb")

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name))

    def clean_temp(self, name: str) -> None:
        pass  # temporary files live in the local temp folder and are removed after each upload

    def temp_path(self, name: str) -> Path:
        fd, path = tempfile.mkstemp(prefix="cbtlab-", suffix=f"-{Path(name).name}")
        os.close(fd)
        return Path(path)

    def commit(self, temp: Path, name: str) -> None:
        try:
            parent = self._path(name).rpartition("/")[0]
            self.fs.makedirs(parent, exist_ok=True)
            with open(temp, "rb") as src, self.fs.open(self._path(name), "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        finally:
            temp.unlink(missing_ok=True)


def open_storage(location: str | Path, *, create: bool = True) -> Storage:
    """A local folder (created if needed and `create`), or an fsspec URL; `pipe:` is not
    supported."""
    text = str(location)
    if text.startswith("pipe:"):
        raise ValueError(
            f"cannot build into {text!r}: a resumable build must see what is already written; "
            "use a local folder or an fsspec URL (s3://..., gs://...)"
        )
    return FsspecStorage(text) if is_url(text) else LocalStorage(text, create=create)
