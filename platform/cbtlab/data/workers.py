"""Loader worker processes kept from epoch to epoch: torch's DataLoader with persistent
workers, running a new job (an epoch's streams) each time.

A `WorkerPool` holds one `DataLoader` (`persistent_workers=True`, batches already formed by the
job: `batch_size=None`) over a dataset that runs, in worker w, the job the pool last sent it:
`run(job, workers, finish)` puts the cloudpickled `job` on each worker's own queue and iterates
the loader once, so the workers, their shared-memory batches, pinning (`pin_memory`) and the
order are torch's. Workers beyond `workers` get no job and end at once.

Order. The DataLoader takes an IterableDataset's batches from its workers round-robin, skipping
workers that are done (in the order of the requests it sent, never of timing), so a run's
batches depend on its jobs only.

Failures. A job's exception is raised again in the main process as itself, the worker's traceback
chained as its cause (`RemoteTraceback`). A worker that dies (killed, out of memory) raises
`LoaderWorkerError` naming it and how it ended. An epoch not read to its end (the consumer broke
off, or an error) stops the workers, so that no job is left half-read in a queue; the next `run`
starts new ones. Workers exit when the pool closes, when it is garbage collected, or when they
find their parent process gone (torch's watchdog).

Why torch's DataLoader and not a pool of our own: `cbtlab data bench` measures the loader
against webdataset's WebLoader and torch's DataLoader over an ImageFolder, and a hand-written
pool (two reused shared-memory slots a worker) was kept only while it beat the best library path
by 1.2x; it did not (docs/training.md has the numbers).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils import signal_handling

log = logging.getLogger(__name__)

# What a job yields, and `run` hands on: (images, labels, corrupt samples skipped since the last).
CountedBatch = tuple[Tensor, Tensor, int]
Job = Callable[[int], Iterable[CountedBatch]]

# Modules a forkserver loads once, before it forks any worker ("__main__": the program's script,
# which every worker would otherwise import again).
FORKSERVER_PRELOAD = ["__main__", "cbtlab.data.workers"]
# Batches each worker makes ahead of the consumer (torch's default).
PREFETCH = 2
# How often a worker checks that the main process is still there (seconds).
WATCH_S = 2.0
# How torch's DataLoader names its dead workers: "DataLoader worker (pid 12) is killed by
# signal: ...", "DataLoader worker (pid(s) 12, 13) exited unexpectedly".
_PIDS = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def default_start_method() -> str | None:
    """How a new pool starts its workers in this process.

    Forked (cheap: no interpreter to start, nothing to import) on Linux, even where the default
    start method is "spawn" or "forkserver" (processes started by torch.multiprocessing.spawn,
    Python >= 3.14); the workers never touch CUDA. But not from a process connected to Ray (a
    driver, a Ray Train worker): a forked copy keeps Ray's sockets and gRPC state, which Ray does
    not support (docs.ray.io, "Anti-pattern: Forking new processes in application code"): with
    pools forked from the test suite's driver, a later `ray.cluster_resources()` there waited for
    ever. There, a forkserver forks them: a fresh interpreter, started once per process (a few
    seconds: it imports torch), that holds no Ray state. Elsewhere, the platform's default."""
    if not sys.platform.startswith("linux"):
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return "forkserver"
    return "fork"


class LoaderWorkerError(RuntimeError):
    """A loader worker process died; the message names it."""


class RemoteTraceback(Exception):
    """A worker's traceback, chained as the cause of the exception it raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the loader worker:\n{self.text}"


@dataclass
class _Failure:
    """A job's exception, as it crosses from a worker."""

    exc: Exception
    text: str


class _Jobs(IterableDataset):
    """What the DataLoader's worker w iterates: the job the pool last put on queue w."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        assert info is not None, "a WorkerPool's jobs run in its loader workers"
        payload = self.queues[info.id].get()
        if payload is None:
            return
        try:
            batches = iter(cloudpickle.loads(payload)(info.id))
            try:
                yield from batches
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # closes the job's shard streams
        except Exception as exc:
            yield _Failure(_portable(exc), traceback.format_exc())


def _worker_init(environ: dict[str, str], owner: tuple[int, str] | None, worker: int) -> None:
    """A forkserver's children inherit its environment, fixed when it started: they get the
    main process's as it was when the pool started (S3 credentials set since, for one).

    And they watch the main process (`owner`: its pid and start time), exiting when it is gone:
    torch's workers watch only their parent, here the forkserver, which lives on while they do
    (each holds its liveness pipe), and they hold both ends of their own queues, which thus
    never report the main process's end."""
    os.environ.clear()
    os.environ.update(environ)
    if owner is not None:
        threading.Thread(target=_exit_with, args=owner, daemon=True).start()


def processes_cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of live processes (Linux's /proc; else None)."""
    total = 0.0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    return total


def _process_start(pid: int) -> str | None:
    """The start time of a live process (Linux's /proc), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _exit_with(pid: int, started: str) -> None:
    while _process_start(pid) == started:
        time.sleep(WATCH_S)
    os._exit(0)


class WorkerPool:
    """Loader worker processes kept across jobs (epochs), started as `run` first needs them.

    One job runs at a time (`busy`). `close()` stops the workers; so does dropping the pool, and
    so does the interpreter's exit."""

    def __init__(self, start_method: str | None = None) -> None:
        """`start_method`: multiprocessing's ("fork", "forkserver", "spawn"); by default
        `default_start_method()` when the workers start."""
        self.start_method = start_method
        self.busy = False
        self._owner = os.getpid()
        self._loader: DataLoader | None = None
        self._queues: list[Any] = []
        self._pin_memory = False
        self._unwatched: int | None = None

    @property
    def pids(self) -> list[int]:
        iterator = self._loader._iterator if self._loader is not None else None
        return [w.pid for w in getattr(iterator, "_workers", []) if w.pid is not None]

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the live workers have used (Linux's /proc; else None).
        Persistent workers are not reaped while the pool lives, so `os.times()`'s children
        columns miss them."""
        return processes_cpu_seconds(self.pids)

    def run(
        self,
        job: Job,
        workers: int,
        finish: Callable[[Tensor], Tensor],
        *,
        pin_memory: bool = False,
    ) -> Iterator[CountedBatch]:
        """`job(w)` in workers w = 0 .. `workers` - 1; yields their batches round-robin, each
        with its images through `finish`. `pin_memory`: the batches arrive in pinned memory
        (pinned by torch's thread while the consumer works), for copies to an accelerator."""
        if self.busy:
            raise RuntimeError("this WorkerPool is already running a job")
        if os.getpid() != self._owner:
            raise RuntimeError("a WorkerPool is used only by the process that made it")
        self.busy = True
        finished = False
        try:
            loader = self._start(workers, pin_memory)
            payload = cloudpickle.dumps(job)
            for index, queue in enumerate(self._queues):
                queue.put(payload if index < workers else None)
            try:
                iterator = iter(loader)  # persistent: the same, reset
                self._unwatch(iterator)
                for item in iterator:
                    if isinstance(item, _Failure):
                        raise item.exc from RemoteTraceback(item.text)
                    images, labels, skipped = item
                    yield finish(images), labels, skipped
            except (RuntimeError, OSError, EOFError) as exc:
                if not self._lost_a_worker(exc):
                    raise
                raise self._died(str(exc)) from exc
            finished = True
        finally:
            self.busy = False
            if not finished:  # a job left half-read: start the next one on new workers
                self.close()

    def close(self) -> None:
        """Stop the workers (a later `run` starts new ones)."""
        loader, self._loader = self._loader, None
        if loader is not None and loader._iterator is not None and os.getpid() == self._owner:
            loader._iterator._shutdown_workers()
            loader._iterator = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _start(self, count: int, pin_memory: bool) -> DataLoader:
        if self._loader is not None and (
            len(self._queues) < count or pin_memory != self._pin_memory or self._dead()
        ):
            self.close()
        if self._loader is None:
            method = self.start_method or default_start_method()
            context = multiprocessing.get_context(method)
            if method == "forkserver":
                context.set_forkserver_preload(FORKSERVER_PRELOAD)  # when the server starts
            self._queues = [context.SimpleQueue() for _ in range(count)]
            self._pin_memory = pin_memory
            self._loader = DataLoader(
                _Jobs(self._queues),
                batch_size=None,  # the jobs form the batches
                num_workers=count,
                persistent_workers=True,
                prefetch_factor=PREFETCH,
                pin_memory=pin_memory,
                multiprocessing_context=context,
                worker_init_fn=functools.partial(_worker_init, dict(os.environ), self._me()),
            )
        return self._loader

    def _me(self) -> tuple[int, str] | None:
        started = _process_start(self._owner)
        return None if started is None else (self._owner, started)

    def _dead(self) -> bool:
        """Whether a worker died between epochs (killed, out of memory): a new set is started,
        nothing lost."""
        iterator = self._loader._iterator if self._loader is not None else None
        # A forkserver's child is reported dead by the server, a moment after it dies: /proc
        # knows at once (on Linux).
        linux = sys.platform.startswith("linux")
        dead = [
            w
            for w in getattr(iterator, "_workers", [])
            if not w.is_alive() or (linux and _process_start(w.pid) is None)
        ]
        if dead:
            log.warning(
                "loader worker pid(s) %s exited while idle; starting new loader workers",
                ", ".join(str(w.pid) for w in dead),
            )
        return bool(dead)

    def _unwatch(self, iterator: Any) -> None:
        """Take the workers out of torch's SIGCHLD handler, which raises a worker's death in
        the main thread wherever it is, even between epochs (an idle worker killed would stop
        training there): the pool finds dead workers itself, idle ones at the next `run`, busy
        ones as the loader waits for them (torch checks every few seconds)."""
        if self._unwatched == id(iterator) or not getattr(iterator, "_worker_pids_set", False):
            return
        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False  # so that its shutdown does not remove them again
        self._unwatched = id(iterator)

    def _lost_a_worker(self, exc: BaseException) -> bool:
        """Whether `exc` is torch's report of a dead worker (its own message, or a broken
        connection to a worker no longer alive)."""
        if isinstance(exc, RuntimeError) and _PIDS.search(str(exc)):
            return True
        if not isinstance(exc, (OSError, EOFError)):
            return False
        iterator = self._loader._iterator if self._loader is not None else None
        workers = getattr(iterator, "_workers", [])
        # A batch's shared memory comes from its worker on request: a worker dying as it exits
        # breaks that connection a moment before it is reported dead.
        deadline = time.monotonic() + WATCH_S
        while not any(not w.is_alive() for w in workers):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _died(self, message: str) -> LoaderWorkerError:
        iterator = self._loader._iterator if self._loader is not None else None
        processes = list(getattr(iterator, "_workers", []))
        found = _PIDS.search(message)
        named = {int(pid) for pid in re.findall(r"\d+", found[1])} if found else set()
        lost = [(i, w) for i, w in enumerate(processes) if w.pid in named or not w.is_alive()]
        descriptions = []
        for index, process in lost or list(enumerate(processes))[:1]:
            process.join(timeout=1.0)
            code = process.exitcode
            how = "is not answering"
            if code is not None and code < 0:
                how = f"was killed by signal {signal.Signals(-code).name}"
            elif code is not None:
                how = f"exited with code {code}"
            descriptions.append(f"loader worker {index} (pid {process.pid}) {how}")
        return LoaderWorkerError(
            f"{', '.join(descriptions)} in the middle of an epoch (out of memory? see the "
            "system log); the epoch is abandoned, and the next one starts new workers"
        )


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(ForkingPickler.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
