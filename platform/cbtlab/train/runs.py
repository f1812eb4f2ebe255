"""The runs of `cbtlab train`: each gets its own name, and a record of itself in its folder.

Ray Train restores a run from `<storage path>/<name>` whenever that folder holds a run of the
same name: when every run took the name `train`, a second `cbtlab train --set train.epochs=2`
silently continued the first from its checkpoint. So a new run is named
`train-YYYYmmdd-HHMMSS-xxxxxx`, and a run is continued only when asked: `--name NAME` of an
unfinished run, or `--resume` alone (the latest unfinished run). `RUN_FILE` in the run's
folder records its config, where it started from and whether it finished; a finished run is
never continued.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbtlab.paths import filesystem_of

RUN_FILE = "cbtlab_run.json"
RUN_VERSION = 1
RUNNING, FAILED, FINISHED = "running", "failed", "finished"


class RunChoiceError(ValueError):
    """The run asked for cannot be started or continued; the message says why."""


@dataclass
class RunRecord:
    """`RUN_FILE` in a run's folder: what continuing it needs, and how it ended."""

    name: str
    storage_path: str
    config: dict[str, Any]  # the flat config (ExperimentConfig.flat) of its latest start
    resume_from: str | None = None  # the checkpoint it first started from (--resume PATH)
    status: str = RUNNING  # running (or killed), failed, finished
    started: str = field(default_factory=lambda: _now().isoformat(timespec="seconds"))
    ended: str = ""
    error: str = ""
    mlflow_run_id: str = ""  # its MLflow run (cbtlab.train.mlflow_run), reopened by a continuation
    version: int = RUN_VERSION

    @property
    def path(self) -> str:
        return f"{run_folder(self.storage_path, self.name)}/{RUN_FILE}"


@dataclass(frozen=True)
class RunChoice:
    """The run `cbtlab train` is about to start: a new one, or an unfinished one continued
    (`previous` is its record)."""

    name: str
    previous: RunRecord | None = None

    @property
    def continues(self) -> bool:
        return self.previous is not None


def _now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def new_run_name(prefix: str = "train", now: dt.datetime | None = None) -> str:
    """A fresh run name: `prefix-YYYYmmdd-HHMMSS-xxxxxx` (6 random hex digits)."""
    return f"{prefix}-{(now or _now()):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_folder(storage_path: str, name: str) -> str:
    """Ray Train's folder of the run `name`: `<storage_path>/<name>`."""
    return f"{storage_path.rstrip('/')}/{name}"


def write_run(record: RunRecord) -> str:
    """Write `record` into its run's folder (local or a URI); return the file's path."""
    fs, inner = filesystem_of(record.path)
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(json.dumps(dataclasses.asdict(record), indent=2).encode())
    return record.path


def read_run(storage_path: str, name: str) -> RunRecord | None:
    """The record of the run `name`, None where its folder holds none."""
    fs, inner = filesystem_of(f"{run_folder(storage_path, name)}/{RUN_FILE}")
    try:
        with fs.open_input_stream(inner) as handle:
            data = json.loads(handle.read().decode())
    except FileNotFoundError:
        return None
    known = {f.name for f in dataclasses.fields(RunRecord)}
    return RunRecord(**{key: value for key, value in data.items() if key in known})


def _folder_exists(storage_path: str, name: str) -> bool:
    import pyarrow.fs

    fs, inner = filesystem_of(run_folder(storage_path, name))
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def latest_unfinished(storage_path: str) -> RunRecord | None:
    """The unfinished run started last under a local `storage_path`, if any."""
    records = [
        read_run(storage_path, path.parent.name)
        for path in Path(storage_path).expanduser().glob(f"*/{RUN_FILE}")
    ]
    unfinished = [r for r in records if r is not None and r.status != FINISHED]
    return max(unfinished, key=lambda r: r.started, default=None)


def choose_run(storage_path: str, name: str | None, *, resume_latest: bool) -> RunChoice:
    """Which run to start: `name` (continued if it is an unfinished run, refused if it
    finished), the latest unfinished run (`resume_latest` without a name), or a new one."""
    if name is None and resume_latest:
        if "://" in storage_path:
            raise RunChoiceError(
                f"--resume without a checkpoint looks for runs in a local folder; under "
                f"{storage_path}, name the run to continue with --name"
            )
        latest = latest_unfinished(storage_path)
        if latest is None:
            raise RunChoiceError(f"no unfinished run to resume under {storage_path}")
        return RunChoice(latest.name, latest)
    if name is None:
        return RunChoice(new_run_name())
    previous = read_run(storage_path, name)
    if previous is None:
        if _folder_exists(storage_path, name):
            raise RunChoiceError(
                f"{run_folder(storage_path, name)} holds no {RUN_FILE} (a run of an older "
                "cbtlab, or not a cbtlab run): choose another --name"
            )
        if resume_latest:
            raise RunChoiceError(f"no run {name!r} to resume under {storage_path}")
        return RunChoice(name)
    if previous.status == FINISHED:
        raise RunChoiceError(
            f"the run {name!r} finished at {previous.ended}: a finished run is not continued; "
            "choose another --name, or start from its checkpoint with --resume CHECKPOINT"
        )
    return RunChoice(name, previous)


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every flat config field that differs."""
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def continue_note(choice: RunChoice, config: Mapping[str, Any]) -> str:
    """What `cbtlab train` says aloud when it continues a run."""
    previous = choice.previous
    assert previous is not None
    changes = config_changes(previous.config, config)
    note = (
        f"continuing the unfinished run {choice.name} (started {previous.started}, "
        f"{previous.status}) from its latest checkpoint"
    )
    if not changes:
        return note + "; no config field changed"
    return note + "; config fields changed: " + ", ".join(changes)


def end_run(record: RunRecord, status: str, error: str = "") -> None:
    """Record how the run ended."""
    record.status, record.error = status, error
    record.ended = _now().isoformat(timespec="seconds")
    write_run(record)
