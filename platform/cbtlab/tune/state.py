"""A study's resume state: `STATE_FILE` in its results folder (local or a URI), what a resumed
driver needs beside Tune's own experiment state, and where a search keeps its Optuna study."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtlab.paths import filesystem_of
from cbtlab.tune.spec import StudySpec

# What a resumed driver needs, beside the study's Tune results (cbtlab.tune.runner.resume_study).
STATE_FILE = "cbtlab_study.json"
STATE_VERSION = 1
# The Optuna study's default storage, a SQLite file in the study's results folder.
OPTUNA_FILE = "optuna.db"


@dataclass
class StudyState:
    """What a resumed driver needs; `STATE_FILE` in the study's results folder."""

    run_name: str  # Tune's experiment name: <study>-<parent run id[:8]>
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    storage_path: str
    spec: dict[str, Any]  # spec_to_dict of the validated spec
    trial_base: dict[str, Any]  # the trials' base config (plan_resources applied)
    optuna_storage: str = ""  # the Optuna study's storage, password hidden ("" for a grid)
    version: int = STATE_VERSION

    @property
    def path(self) -> str:
        return study_path(self.storage_path, self.run_name)


def study_path(storage_path: str, run_name: str) -> str:
    """A study's results folder: Tune's experiment folder `<storage_path>/<run_name>`."""
    return f"{storage_path.rstrip('/')}/{run_name}"


def write_study_state(state: StudyState) -> str:
    """Write `state` to its study's results folder (local or a URI); return the file's path."""
    path = f"{state.path}/{STATE_FILE}"
    fs, inner = filesystem_of(path)
    fs.create_dir(inner.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(inner) as out:
        out.write(json.dumps(dataclasses.asdict(state), indent=2).encode())
    return path


def read_study_state(path: str) -> StudyState:
    """The state of the study whose results folder (or state file) is `path`."""
    text = path.rstrip("/")
    if not text.endswith(STATE_FILE):
        text = f"{text}/{STATE_FILE}"
    fs, inner = filesystem_of(text)
    try:
        with fs.open_input_stream(inner) as handle:
            data = json.loads(handle.read().decode())
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"no study to resume at {path}: expected {STATE_FILE}, which a study writes in its "
            f"results folder <storage path>/<study>-<run id>/ ({exc})"
        ) from exc
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{text}: state version {data.get('version')}, expected {STATE_VERSION}")
    known = {f.name for f in dataclasses.fields(StudyState)}
    return StudyState(**{key: value for key, value in data.items() if key in known})


def latest_study_path(storage_path: str, name: str) -> str:
    """The results folder of the study `name` started last under a local `storage_path`."""
    found = sorted(
        Path(storage_path).expanduser().glob(f"{name}-*/{STATE_FILE}"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise FileNotFoundError(
            f"no study {name!r} to resume under {storage_path} (no {name}-*/{STATE_FILE})"
        )
    return str(found[-1].parent)


def optuna_storage_url(spec: StudySpec, run_name: str) -> str:
    """`spec.optuna_storage`, else a SQLite file in the study's (local) results folder; a
    remote results folder needs a shared database (`StudySpec.validate` refuses one without)."""
    if spec.optuna_storage:
        return spec.optuna_storage
    if "://" in spec.storage_path:
        raise ValueError(f"{spec.storage_path} is remote: give the study an Optuna database")
    folder = Path(spec.storage_path) / run_name
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / OPTUNA_FILE}"
