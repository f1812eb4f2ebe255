"""ASHA for studies: a resumed study stops the same trials at the same epochs as one never
interrupted.

Ray's `ASHAScheduler` keeps its rungs (each trial's metric at each milestone) in memory only,
and `Tuner.restore` brings the scheduler back as it was pickled when the study started
(tuner.pkl): a resumed study had forgotten every rung and stopped no trial. Its usual clock,
`training_iteration`, counts Tune results, which start again at 1 when a trial restarts from an
epoch checkpoint.

`StudyScheduler` makes the same decisions with or without a resume, given the same trials
reporting the same values in the same order (one trial at a time, as a search runs):

- Its clock is the `epoch` a trial reports (epochs completed), which a restarted trial keeps.
- It writes its state (each rung's value per trial id, and the epoch at which it stopped each
  trial) to `STATE_FILE` in the study's results folder after every change, before Tune sees the
  decision. A resumed driver reads it when Tune adds the first trial, before any result. The
  file never lags behind a decision Tune may have acted on, so nothing depends on when Tune
  last saved its own experiment state (at most every 10 s).
- A trial that Tune's saved state does not hold (it started after Tune last saved) is a new
  trial to the resumed study, with a new id: what the old id recorded is dropped at the first
  result after the state is read, and the new trial records it again when it gets there.
- A restarted trial re-reports epochs that the scheduler already ruled on: its Train run goes on
  from its latest checkpoint, which can be behind the last result the scheduler saw, and Tune's
  saved state can be older still. Such results record nothing (a rung keeps the first value of
  each trial). A trial it stopped at epoch e is stopped again at its first result from epoch e
  on, and earlier epochs continue as they did the first time.

The file is written and read through the filesystem of the trials' storage context
(`trial.storage`). A resumed study therefore finds it wherever its results folder now is, local
or remote. It is written to a temporary name and then moved into place, so a driver killed
mid-write leaves the previous state.

Not covered: with several trials at once, the order in which results arrive depends on timing,
with or without a resume. And a driver killed in the instant between a Train checkpoint and its
result reaching the scheduler brings back a trial that never reports that epoch: if the epoch
was a rung's milestone, the trial's next epoch is recorded there in its place.
"""

from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

STATE_FILE = "cbtlab_asha.json"
STATE_VERSION = 1
EPOCH_KEY = "epoch"  # the clock: epochs completed, as train/loop.py reports them


class StudyScheduler(AsyncHyperBandScheduler):
    """ASHA (one bracket) on the reported `epoch`. It keeps its rungs and its stop decisions in
    `STATE_FILE` in the study's results folder and reads them back on a resumed study."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float) -> None:
        super().__init__(
            time_attr=EPOCH_KEY,
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
        self._stopped: dict[str, float] = {}  # trial id -> the epoch ASHA stopped it at
        self._store: tuple[Any, str] | None = None  # (pyarrow filesystem, file path)
        self._unchecked = False  # state read back, its trial ids not yet checked against Tune's

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into tuner.pkl before the study runs: the resumed driver finds its own store.
        return {**self.__dict__, "_store": None}

    # --- Tune's hooks -------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self._store is None:
            self._attach(trial.storage.storage_filesystem, trial.storage.experiment_fs_path)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._forget_unknown_trials(tune_controller)
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = result[self._time_attr]
        stopped_at = self._stopped.get(trial.trial_id)
        if stopped_at is not None:  # a restarted trial re-reports: take the same decision
            return TrialScheduler.STOP if epoch >= stopped_at else TrialScheduler.CONTINUE
        recorded = self._recorded()
        action = super().on_trial_result(tune_controller, trial, result)
        changed = self._recorded() != recorded
        if action == TrialScheduler.STOP and epoch < self._max_t:
            self._stopped[trial.trial_id] = epoch
            changed = True
        if changed:
            self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._forget_unknown_trials(tune_controller)
        recorded = self._recorded()
        super().on_trial_complete(tune_controller, trial, result)
        if self._recorded() != recorded:
            self._save()

    # --- state ---------------------------------------------------------------------------------

    def _recorded(self) -> int:
        return sum(len(values) for bracket in self._brackets for _, values in bracket._rungs)

    def state(self) -> dict[str, Any]:
        """The decisions so far: each rung's values, in the metric's own units, per trial id,
        and the epoch at which each trial was stopped."""
        sign = self._metric_op or 1.0
        return {
            "version": STATE_VERSION,
            "clock": self._time_attr,
            "metric": self._metric,
            "mode": self._mode,
            "brackets": [
                [
                    {"milestone": milestone, "values": {t: sign * v for t, v in values.items()}}
                    for milestone, values in bracket._rungs
                ]
                for bracket in self._brackets
            ],
            "stopped": dict(self._stopped),
        }

    def load_state(self, data: dict[str, Any]) -> None:
        """Take the decisions of `state()` back, checking they come from the same ASHA."""
        sign = self._metric_op or 1.0
        layout = [[m for m, _ in b._rungs] for b in self._brackets]
        saved = [[rung["milestone"] for rung in b] for b in data["brackets"]]
        mine = (STATE_VERSION, self._time_attr, self._metric, self._mode, layout)
        theirs = (data["version"], data["clock"], data["metric"], data["mode"], saved)
        if mine != theirs:
            raise ValueError(f"{STATE_FILE}: saved by another scheduler {theirs}, not {mine}")
        for bracket, rungs in zip(self._brackets, data["brackets"], strict=True):
            bracket._rungs = [
                (milestone, {t: sign * v for t, v in rung["values"].items()})
                for (milestone, _), rung in zip(bracket._rungs, rungs, strict=True)
            ]
        self._stopped = dict(data["stopped"])

    def _forget_unknown_trials(self, tune_controller: Any) -> None:
        """Once, after the state is read: drop the trials that Tune did not restore. Tune adds
        every trial it restored before any result arrives."""
        if not self._unchecked:
            return
        self._unchecked = False
        known = {trial.trial_id for trial in tune_controller.get_trials()}
        recorded = self._recorded()
        for bracket in self._brackets:
            for _, values in bracket._rungs:
                for trial_id in [t for t in values if t not in known]:
                    del values[trial_id]
        stopped = {t: epoch for t, epoch in self._stopped.items() if t in known}
        if self._recorded() != recorded or stopped != self._stopped:
            self._stopped = stopped
            self._save()

    def _attach(self, filesystem: Any, folder: str) -> None:
        """Keep the state in `folder` on `filesystem`; read what a previous driver saved."""
        import pyarrow.fs

        folder = folder.rstrip("/")
        filesystem.create_dir(folder, recursive=True)  # Tune's own folder: there already
        path = f"{folder}/{STATE_FILE}"
        self._store = (filesystem, path)
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.File:
            with filesystem.open_input_stream(path) as handle:
                self.load_state(json.loads(handle.read().decode()))
            self._unchecked = True

    def _save(self) -> None:
        if self._store is None:
            raise RuntimeError("StudyScheduler: a result came before any trial was added")
        filesystem, path = self._store
        partial = f"{path}.partial"
        with filesystem.open_output_stream(partial) as out:
            out.write(json.dumps(self.state(), indent=1).encode())
        filesystem.move(partial, path)
