"""The Ray Train callback that keeps a bad value from being retried.

Ray Train's FailureConfig restarts the worker group after any worker error, up to
`train.max_failures` times. A crash may pass on a restart; a bad value (a ValueError from the
optimiser on `train.lr=nan`, a KeyError on a missing tensor) is raised again by each, so the
run only ended, after a minute of restarts, in the same error. The callback runs on the Train
controller: on a deterministic error (`DeterministicFailure.from_worker_errors`) it raises a
ControllerError, which the controller's failure policy never retries; the trainer's `fit`
raises the `DeterministicFailure` it carries."""

from __future__ import annotations

from typing import Any

from ray.train import ControllerError, UserCallback

from cbtlab.train.messages import DeterministicFailure


class StopOnDeterministicError(UserCallback):
    """Fail the run at the first deterministic worker error; leave crashes to FailureConfig."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        failure = DeterministicFailure.from_worker_errors(worker_exceptions)
        if failure is not None:
            raise ControllerError(failure)
