"""Loader worker processes that outlive an epoch and hand batches over in reused shared memory.

A `WorkerPool` starts its processes once and keeps them for every epoch it runs (in place of
torch's DataLoader); each worker owns `SLOTS` shared-memory buffers, mapped once in both
processes, and a batch crosses as a slot number with its labels.

Protocol: one duplex pipe per worker.
- Main -> worker: ("job", generation, payload) runs the cloudpickled callable `payload(worker)`
  and sends the `(images, labels, skipped)` batches it yields; ("free", slot) says the main
  process is done with a slot; ("cancel", generation) stops that job; ("stop",) ends the worker.
- Worker -> main: ("slot", i, tensor) makes slot i that shared buffer (sent when first made, or
  remade larger); ("batch", generation, i, shape, dtype, labels, skipped); ("end", generation);
  ("error", generation, exception, traceback).
A worker runs at most `SLOTS` batches ahead: it writes only into a free slot, and the main
process frees a slot as soon as `finish` has made the batch its own (moved to the device,
normalised, or copied).

Order. `run` takes the workers' batches round-robin, skipping workers that are done: the order in
which torch's DataLoader hands out an IterableDataset's batches, so a run's batches depend on its
jobs only, never on timing.

Failures. A job's exception is raised again in the main process as itself, the worker's traceback
chained as its cause. A worker that dies (killed, out of memory) raises `LoaderWorkerError` naming
it and its exit code, and the pool shuts down; its next `run` starts new workers. Stopping early
(the consumer breaks off or raises) cancels the job in every worker and waits for each to
acknowledge, so the next job starts clean. Workers exit when the pool closes, when it is garbage
collected, or when they find their parent process gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle
import torch
from torch import Tensor

log = logging.getLogger(__name__)

# What a job yields, and `run` hands on: (images, labels, corrupt samples skipped since the last).
CountedBatch = tuple[Tensor, Tensor, int]
Job = Callable[[int], Iterable[CountedBatch]]

# Shared-memory batch buffers per worker: one the main process is reading, one being filled.
SLOTS = 2
# Modules a forkserver loads once, before it forks any worker ("__main__": the program's script,
# which every worker would otherwise import again).
FORKSERVER_PRELOAD = ["__main__", "cbtlab.data.workers"]
# How often a waiting side checks that the other is still alive (seconds).
LIVENESS_S = 2.0
# How long stopping a job may take before the pool is given up (seconds): a worker finishes the
# batch it is making first, which may be reading a slow remote shard.
CANCEL_TIMEOUT_S = 120.0


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
    """A loader worker process died, or stopped answering; the message names it."""


class RemoteTraceback(Exception):
    """A worker's traceback, chained as the cause of the exception it raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the loader worker:\n{self.text}"


class WorkerPool:
    """Loader worker processes kept across jobs (epochs), started as `run` first needs them.

    One job runs at a time (`busy`). `close()` stops the workers; so does dropping the pool, and
    so does the interpreter's exit."""

    def __init__(self, start_method: str | None = None) -> None:
        """`start_method`: multiprocessing's ("fork", "forkserver", "spawn"); by default
        `default_start_method()` when the workers start."""
        self.start_method = start_method
        self._workers: list[_Worker] = []
        self._generation = 0
        self.busy = False
        self._owner = os.getpid()
        # Stops the workers when the pool is collected or the interpreter exits; holds the list,
        # not the pool, so that it does not keep the pool alive.
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, self._owner)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the live workers have used (Linux's /proc; else None).
        Pool workers are never reaped while the pool lives, so `os.times()`'s children
        columns miss them."""
        total = 0.0
        try:
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        return total

    def run(
        self, job: Job, workers: int, finish: Callable[[Tensor], Tensor]
    ) -> Iterator[CountedBatch]:
        """`job(w)` in workers w = 0 .. `workers` - 1; yields their batches round-robin, each
        with its images through `finish` (a result on the shared buffer itself is copied), so
        what it yields stays valid."""
        if self.busy:
            raise RuntimeError("this WorkerPool is already running a job")
        if os.getpid() != self._owner:
            raise RuntimeError("a WorkerPool is used only by the process that made it")
        self.busy = True
        try:
            for attempt in (1, 2):
                self._start(workers)
                self._generation += 1
                started = False
                try:
                    for batch in self._run(self._workers[:workers], self._generation, job, finish):
                        started = True
                        yield batch
                    return
                except LoaderWorkerError as exc:
                    # A worker lost before the job's first batch (it died idle, as the job was
                    # sent): the job runs again, from its start, on new workers.
                    if started or attempt == 2:
                        raise
                    log.warning("%s; running the job again on new loader workers", exc)
        finally:
            self.busy = False

    def close(self) -> None:
        """Stop the workers (a later `run` starts new ones)."""
        _stop_all(self._workers, self._owner)
        self._workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, count: int) -> None:
        dead = [w.name for w in self._workers if not w.process.is_alive()]
        if dead:  # between epochs (killed, out of memory): a new set, nothing lost
            log.warning("%s exited while idle; starting new loader workers", ", ".join(dead))
            self.close()
        method = self.start_method or default_start_method()
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(FORKSERVER_PRELOAD)  # used when the server starts
        while len(self._workers) < count:
            index = len(self._workers)
            mine, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                # A forkserver's children inherit its environment, fixed when it started: they
                # get this process's, as it is now (S3 credentials set since, for one).
                args=(index, theirs, dict(os.environ)),
                name=f"cbtlab-loader-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()  # so that our reads see the end of the pipe if the worker dies
            self._workers.append(_Worker(index, process, mine))

    def _run(
        self,
        workers: list[_Worker],
        generation: int,
        job: Job,
        finish: Callable[[Tensor], Tensor],
    ) -> Iterator[CountedBatch]:
        payload = cloudpickle.dumps(job)
        for worker in workers:
            worker.send(("job", generation, payload))
        running = list(workers)
        try:
            while running:
                for worker in list(running):
                    message = worker.receive()
                    kind = message[0]
                    if message[1] != generation:  # the protocol's guard, not a path
                        raise LoaderWorkerError(f"{worker.name} answered job {message[1]}")
                    if kind == "end":
                        running.remove(worker)
                    elif kind == "error":
                        running.remove(worker)
                        _, _, exc, text = message
                        raise exc from RemoteTraceback(text)
                    else:
                        _, _, slot, shape, stride, dtype, labels, skipped = message
                        images = worker.take(slot, shape, stride, dtype, finish)
                        yield images, torch.tensor(labels, dtype=torch.long), skipped
        except LoaderWorkerError:
            self.close()
            raise
        finally:
            if running and self._workers:
                self._cancel(running, generation)

    def _cancel(self, workers: list[_Worker], generation: int) -> None:
        """Stop `generation` in `workers` and drain their pipes (freeing the slots of batches
        nobody will read), so that the next job starts clean; give the pool up on failure."""
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        try:
            for worker in workers:
                worker.send(("cancel", generation))
            for worker in workers:
                while True:
                    message = worker.receive(deadline)
                    if message[0] in ("end", "error"):
                        break
                    if message[2] is not None:  # a batch nobody will read: its slot is free
                        worker.send(("free", message[2]))
        except Exception as exc:  # died, hung, or a message cut off by an interrupt
            log.warning("loader workers did not stop cleanly (%r); starting new ones", exc)
            self.close()


class _Worker:
    """The main process's end of one worker: its process, pipe and mapped slots."""

    def __init__(self, index: int, process: Any, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.slots: list[Tensor | None] = [None] * SLOTS
        self.name = f"loader worker {index} (pid {process.pid})"

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except OSError as exc:
            raise self._died() from exc

    def receive(self, deadline: float | None = None) -> tuple[Any, ...]:
        """The worker's next message, taking in its slot buffers on the way."""
        while True:
            try:
                while not self.conn.poll(LIVENESS_S):
                    if not self.process.is_alive():
                        raise self._died()
                    if deadline is not None and time.monotonic() > deadline:
                        raise LoaderWorkerError(f"{self.name} stopped answering")
                message = self.conn.recv()
            except (EOFError, OSError) as exc:
                raise self._died() from exc
            if message[0] != "slot":
                return message
            self.slots[message[1]] = message[2]

    def take(
        self,
        slot: int | None,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: torch.dtype,
        finish: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """`finish` of the batch in `slot`, made independent of the slot, which is then freed."""
        if slot is None:  # an empty batch: no bytes crossed
            return torch.empty(shape, dtype=dtype)
        buffer = self.slots[slot]
        assert buffer is not None, "a batch arrived in a slot never sent"
        try:
            images = finish(_as_batch(buffer, shape, stride, dtype))
            if images.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                images = images.clone()
        finally:
            self.send(("free", slot))
        return images

    def _died(self) -> LoaderWorkerError:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        how = "is not answering"
        if code is not None and code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        elif code is not None:
            how = f"exited with code {code}"
        return LoaderWorkerError(
            f"{self.name} {how} in the middle of an epoch (out of memory? see the system log); "
            "the epoch is abandoned, and the next one starts new workers"
        )


def _as_batch(
    buffer: Tensor, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """A dense tensor of `shape`, `stride` and `dtype` on the start of a uint8 `buffer`."""
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[:nbytes].view(dtype).as_strided(shape, stride)


def _channels_last(tensor: Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def _stop_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() != owner:  # a forked copy of the pool, in a worker: not its to stop
        return
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send(("stop",))
    for worker in workers:
        worker.process.join(timeout=1.0)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(timeout=1.0)
        worker.conn.close()


# The worker process.


class _Stop(Exception):
    """The main process asked this worker to exit."""


def _worker_main(index: int, conn: Connection, environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops us
    torch.set_num_threads(1)  # the workers take the cores between them
    # Our parent: the main process, or the forkserver, which exits when the main process does.
    state = _WorkerState(index, conn, os.getppid())
    try:
        while True:
            message = state.receive()
            if message[0] == "job":
                state.run(message[1], message[2])
            elif message[0] == "free":
                state.free.append(message[1])
            elif message[0] == "stop":
                return
            # ("cancel", g) of a job that has already ended: nothing to stop.
    except (_Stop, EOFError, OSError):
        return


class _WorkerState:
    def __init__(self, index: int, conn: Connection, parent: int) -> None:
        self.index = index
        self.conn = conn
        self.parent = parent
        self.slots: list[Tensor | None] = [None] * SLOTS
        self.free = list(range(SLOTS))

    def receive(self) -> tuple[Any, ...]:
        while not self.conn.poll(LIVENESS_S):
            if os.getppid() != self.parent:  # orphaned: the main process is gone
                raise _Stop
        return self.conn.recv()

    def run(self, generation: int, payload: bytes) -> None:
        try:
            batches = iter(cloudpickle.loads(payload)(self.index))
            try:
                for images, labels, skipped in batches:
                    if not self._send(generation, images, labels, skipped):
                        break  # cancelled
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # closes the job's shard streams
        except (_Stop, EOFError):
            raise
        except Exception as exc:
            self.conn.send(("error", generation, _portable(exc), traceback.format_exc()))
            return
        self.conn.send(("end", generation))

    def _send(self, generation: int, images: Tensor, labels: Tensor, skipped: int) -> bool:
        """Put one batch in a free slot and announce it; False if the job was cancelled."""
        if not (images.is_contiguous() or _channels_last(images)):
            images = images.contiguous()
        # The slot keeps the batch's memory layout (strides): copying into another would be a
        # transposing copy.
        shape, stride = tuple(images.shape), images.stride()
        nbytes = images.numel() * images.element_size()
        slot = None
        if nbytes:
            slot = self._acquire(generation)
            if slot is None:
                return False
            buffer = self.slots[slot]
            if buffer is None or buffer.numel() < nbytes:
                # Written through once here, so its pages are in place before any batch is.
                buffer = self.slots[slot] = torch.zeros(nbytes, dtype=torch.uint8).share_memory_()
                self.conn.send(("slot", slot, buffer))
            _as_batch(buffer, shape, stride, images.dtype).copy_(images)
        labels_list = labels.tolist()
        message = ("batch", generation, slot, shape, stride, images.dtype, labels_list, skipped)
        self.conn.send(message)
        return True

    def _acquire(self, generation: int) -> int | None:
        """A free slot, waiting for the main process to free one; None if `generation` is
        cancelled meanwhile (a cancel is read before any free slot is used)."""
        while True:
            while self.conn.poll():
                if self._cancelled(self.conn.recv(), generation):
                    return None
            if self.free:
                return self.free.pop(0)
            if self._cancelled(self.receive(), generation):
                return None

    def _cancelled(self, message: tuple[Any, ...], generation: int) -> bool:
        if message[0] == "free":
            self.free.append(message[1])
        elif message[0] == "stop":
            raise _Stop
        return message[0] == "cancel" and message[1] == generation


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(ForkingPickler.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
