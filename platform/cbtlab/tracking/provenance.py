"""Provenance recorded with every run: code version, config hash, data hash, packages."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from cbtlab.tracking.schema import (
    DATA_HASH_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    TAG_PREFIX,
    VERSION_TAG_PREFIX,
)

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


def provenance_tags() -> dict[str, str]:
    """The code and package tags every run carries (`cbtlab.git_commit`, `cbtlab.git_dirty`,
    `cbtlab.version.<package>`); the data hash is added by whoever knows the dataset."""
    return {
        **{f"{TAG_PREFIX}{k}": v for k, v in git_state().items()},
        **{f"{VERSION_TAG_PREFIX}{k}": v for k, v in package_versions().items()},
    }


def provenance_differences(logged: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What differs between the provenance tags a run logged and those of this process, one
    sentence each: code (git commit, uncommitted changes), data (`cbtlab.data_hash`, when both
    have it) and package versions. Empty when nothing that was logged differs."""
    problems = []
    commit, now = logged.get(GIT_COMMIT_TAG, "unknown"), current.get(GIT_COMMIT_TAG)
    if commit == "unknown":
        problems.append("code: the run logged no git commit (it did not run from a checkout)")
    elif now != commit:
        problems.append(f"code: the run was logged at git commit {commit}, this code is at {now}")
    if logged.get(GIT_DIRTY_TAG) == "true":
        problems.append(
            "code: the run's checkout had uncommitted changes, so its exact code is not recorded"
        )
    if current.get(GIT_DIRTY_TAG) == "true":
        problems.append("code: this checkout has uncommitted changes")
    data, data_now = logged.get(DATA_HASH_TAG), current.get(DATA_HASH_TAG)
    if data and data_now and data != data_now:
        problems.append(f"data: the dataset's content hash is {data_now}, the run logged {data}")
    prefix = VERSION_TAG_PREFIX
    changed = [
        f"{key[len(prefix) :]} {current.get(key, 'absent')} (logged {value})"
        for key, value in sorted(logged.items())
        if key.startswith(prefix) and current.get(key, "absent") != value
    ]
    if changed:
        problems.append("packages: " + ", ".join(changed))
    return problems
