"""The Tune driver callback that writes every trial to MLflow and prints progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from cbtlab.config import ExperimentConfig
from cbtlab.tracking import StudyTracker
from cbtlab.tracking.mlflow_tracker import start_system_metrics
from cbtlab.tracking.schema import (
    BEST_TRACKED,
    CELL_TAG,
    CHECKPOINT_TAG,
    CONFIG_HASH_TAG,
    EPOCHS_TAG,
    ERROR_TAG,
    SEED_TAG,
    STOPPED_EARLY_TAG,
    TIME_KEY,
    TRIAL_METRIC_PREFIXES,
    TRIAL_TAG,
    TrialRecord,
    record_from_run,
    run_params,
    trial_config,
)
from cbtlab.train.messages import MID_EPOCH_KEY, Diverged
from cbtlab.tune.stats import cell_label

# A trial's last result before it raises a bad value's error (`Diverged`,
# `DeterministicFailure`): every restart would fail the same way, so Tune must not run it again.
NO_RETRY_KEY = "cbtlab/no_retry"


class EpochReportCallback(TuneReportCallback):
    """Ray Train -> Tune, one result per epoch: the mid-epoch checkpoints' reports
    (`train.checkpoint_every_steps`) stay with Ray Train, which restarts from them, and never
    reach the searcher, the scheduler's epoch count or MLflow."""

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics and metrics[0].get(MID_EPOCH_KEY):
            return
        super().after_report(run_context, metrics, checkpoint)


class NoRetry(Callback):
    """Trials that failed on a bad value (they said so with `NO_RETRY_KEY`) are not run again:
    Tune's FailureConfig retries any failure up to max_failures, and has no per-error choice;
    the trial's own limit is read when its error arrives, after this result."""

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get(NO_RETRY_KEY):
            trial.max_failures = 0


class MLflowTrialLogger(Callback):
    """Creates a nested MLflow child run per trial and logs its per-epoch metrics.

    Runs in the Tune driver process only, so one writer serves all trials. A resumed study
    (`Tuner.restore`) brings back a copy of this callback as it was pickled when the study
    started; `setup` then re-attaches it to the child runs already under the parent (found by
    their `cbtlab.trial_id` tag), so a restored trial goes on writing to its own run: a finished
    one is left as it is, an unfinished or failed one is reopened, and epochs it had logged are
    not logged twice.
    """

    def __init__(
        self,
        tracker: StudyTracker,
        *,
        parent_run_id: str,
        base: ExperimentConfig,
        tags: dict[str, str],
        metric: str,
        cell_keys: Sequence[str] = (),
        verbose: bool = True,
    ) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.base = base
        self.tags = tags
        self.metric = metric
        # The searched keys: a trial's values of them (its cell) go to the tag cbtlab.cell.
        self.cell_keys = list(cell_keys)
        self.verbose = verbose
        self.records: dict[str, TrialRecord] = {}
        # MLflow's system-metrics monitor of each open trial run (threads: never pickled).
        self._monitors: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a resumed study starts anew.
        state = self.__dict__.copy()
        state.pop("_monitors", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._monitors = {}

    def _watch(self, run_id: str, *, resume: bool = False) -> None:
        """Log this machine's system metrics (MLflow's monitor) into the run while it is open."""
        if run_id not in self._monitors:
            monitor = start_system_metrics(self.tracker.tracking_uri, run_id, resume=resume)
            if monitor is not None:
                self._monitors[run_id] = monitor

    def _say(self, text: str) -> None:
        # Look sys.stdout up at call time: Tune pickles its callbacks with the experiment state.
        if self.verbose:
            print(text, file=sys.stdout, flush=True)

    def reattach(self) -> None:
        """Load the records of the trial runs already under the parent run (a resumed study)."""
        for run in self.tracker.child_runs(self.parent_run_id):
            record = record_from_run(self.tracker.client, run, self.metric)
            if record is not None and record.trial_id not in self.records:
                self.records[record.trial_id] = record

    def setup(self, **info: Any) -> None:
        self.reattach()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records.get(trial.trial_id)
        if record is not None:  # restarted after a failure, or restored by a resumed study
            if record.ended is not None and record.status == "FINISHED":
                self._say(f"[{trial}] restored: already finished, its run is kept as logged")
            elif record.ended is not None or record.reattached:
                if record.ended is not None:
                    self.tracker.reopen(record.run_id)
                record.ended, record.status, record.started = None, "RUNNING", time.monotonic()
                self._watch(record.run_id, resume=True)
                self._say(f"[{trial}] restored: continues its run after {record.epochs} epochs")
            record.reattached = False
            return
        cfg = trial_config(self.base, trial.config)
        tags = {
            **self.tags,
            TRIAL_TAG: trial.trial_id,
            CONFIG_HASH_TAG: cfg.config_hash(),
            SEED_TAG: str(cfg.train.seed),
        }
        if self.cell_keys:
            flat = cfg.flat()
            tags[CELL_TAG] = cell_label({k: flat[k] for k in self.cell_keys})
        run_id = self.tracker.start_run(
            str(trial), params=run_params(cfg), tags=tags, parent_run_id=self.parent_run_id
        )
        self.records[trial.trial_id] = TrialRecord(trial.trial_id, str(trial), cfg, run_id)
        self._watch(run_id)
        settings = ", ".join(f"{k}={v}" for k, v in sorted(trial.config.items()))
        self._say(f"[{trial}] started: {settings}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        record = self.records[trial.trial_id]
        if record.ended is not None or result.get(NO_RETRY_KEY):
            return  # a finished trial that Tune restored as unfinished; a failing trial's note
        diverged = Diverged.from_metrics(result)
        if diverged is not None:
            self._say(f"[{trial}] diverged: {diverged}")
            return
        metrics = {
            k: v
            for k, v in result.items()
            if k.startswith(TRIAL_METRIC_PREFIXES) and isinstance(v, (int, float))
        }
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        # A restarted trial first reports again every epoch its checkpoint finished (reports
        # may have died with the trial's driver while its workers trained on): each epoch is
        # logged and said once.
        again = epoch <= record.logged_through
        if not again:
            self.tracker.log_metrics(record.run_id, metrics, step=epoch)
            record.logged_through = epoch
        if result.get("checkpoint_path"):
            # Where the trial's latest checkpoint lives (the probes and re-runs load it).
            self.tracker.set_tags(record.run_id, {CHECKPOINT_TAG: str(result["checkpoint_path"])})
        record.epochs = epoch
        record.last = metrics
        if isinstance(metrics.get(self.metric), (int, float)):
            record.history[epoch] = float(metrics[self.metric])
        for key in BEST_TRACKED:
            if key not in metrics:
                continue
            value, best = metrics[key], record.best.get(key)
            if best is None or (value < best if key.endswith("loss") else value > best):
                record.best[key] = value
        if again:
            return
        self._say(
            f"[{trial}] epoch {epoch}/{record.config.train.epochs} "
            f"train/loss {metrics.get('train/loss', float('nan')):.4f} "
            f"{self.metric} {metrics.get(self.metric, float('nan')):.4f}"
        )

    def _finish(self, trial: Any, status: str, error: str = "") -> None:
        record = self.records.get(trial.trial_id)
        if record is not None:
            self._end(record, status, error)

    def end_open_runs(self, status: str) -> None:
        """Close the runs of trials still open when the study stops (interrupted, crashed)."""
        for record in self.records.values():
            self._end(record, status, f"the study stopped ({status}) while this trial ran")

    def _end(self, record: TrialRecord, status: str, error: str = "") -> None:
        if record.ended is not None:
            return
        record.ended = time.monotonic()
        record.status = status
        record.error = error
        stopped_early = status == "FINISHED" and record.epochs < record.config.train.epochs
        record.stopped_early = stopped_early
        tags = {
            EPOCHS_TAG: str(record.epochs),
            STOPPED_EARLY_TAG: str(stopped_early).lower(),
        }
        if error:
            tags[ERROR_TAG] = error[-5000:]
        self.tracker.set_tags(record.run_id, tags)
        self.tracker.log_metrics(
            record.run_id,
            {f"best/{k}": v for k, v in record.best.items()} | {TIME_KEY: record.seconds},
            step=record.epochs,
        )
        monitor = self._monitors.pop(record.run_id, None)
        if monitor is not None:  # its last samples logged before the run ends
            monitor.finish()
        self.tracker.end_run(record.run_id, status)
        note = " (stopped early by the scheduler)" if stopped_early else ""
        self._say(f"[{record.name}] {status.lower()} after {record.epochs} epochs{note}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that failed (its driver lost with its node, say) and that Tune runs again:
        its Train run goes on from its latest checkpoint, its MLflow run stays open."""
        retries = getattr(trial, "num_failures", "?")
        self._say(f"[{trial}] failed (failure {retries}): running it again from its checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = ""
        path = getattr(trial, "error_file", None)
        if path:
            try:
                with open(path) as handle:
                    error = handle.read()
            except OSError:
                error = f"see {path}"
        self._finish(trial, "FAILED", error or "trial failed")
