"""Provenance recorded with every run: code version, config hash, data hash, packages."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

TRACKED_PACKAGES = ("torch", "ray", "timm", "optuna", "mlflow", "webdataset", "pyarrow", "cbtlab")


def git_state(path: Path | None = None) -> dict[str, str]:
    """The commit and dirty flag of the repository holding `path` (this package by default);
    'unknown' outside a git checkout (e.g. a `ray job submit` working directory)."""
    where = path or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
