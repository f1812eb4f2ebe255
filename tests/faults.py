"""Faults injected into the shard builders by the tests that check what a crash leaves behind."""

from __future__ import annotations

import pytest

from cbtlab.data.sources import ImageFolderSource

# What the injected read failure says (each test matches it in the builder's message).
DISK_GONE = "disk went away"


def fail_read_number(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the `n`-th `ImageFolderSource.read` from now raise `RuntimeError(DISK_GONE)`, as
    if the disk went away mid-build (`monkeypatch.undo()` ends it)."""
    read, calls = ImageFolderSource.read, 0

    def crashing_read(self, record):
        nonlocal calls
        calls += 1
        if calls == n:
            raise RuntimeError(DISK_GONE)
        return read(self, record)

    monkeypatch.setattr(ImageFolderSource, "read", crashing_read)
