"""One OS thread per device that owns every operation on it, fed by a job queue whose
admissions are bounded.

Libraries like torch (CUDA contexts, streams) and llama.cpp (not thread-safe) are simplest and
safest when exactly one thread touches a device. Callers submit small callables and await an
asyncio future; model objects and tensors stay on the worker thread. Jobs are step-sized (a
decode job runs a few tokens at most, and only one while another job is waiting: see
``cortex.neuron.generation``), so two streams on one device interleave in FIFO order, and a
stream whose client left simply stops submitting steps.

``max_queue`` bounds *requests*, not jobs: a request is admitted once, at its first job (a
generation holds its :class:`Admission` until it ends), and the jobs it queues afterwards (the
prefill, each decode job, the final flush and close) are never refused. Bounding jobs instead
refused a running stream's next decode job whenever other requests had filled the queue, and
cut an answer that had already started with a ``queue_full`` error mid-stream.

A :class:`~cortex.harness.DeviceFault` poisons the worker: it then fails every job fast with
:class:`DevicePoisonedError` instead of touching a broken context. Other devices keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cortex.devices import Device
from cortex.harness import DeviceFault

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerError(Exception):
    """Base of the errors a worker itself raises (not those of the job)."""


class DevicePoisonedError(WorkerError):
    """The device had a fault earlier; nothing runs on it until the neuron restarts."""


class QueueFullError(WorkerError):
    """The device already has ``max_queue`` requests in progress; the caller should retry
    later."""


class WorkerStoppedError(WorkerError):
    """The worker was stopped (neuron shutting down)."""


class Admission:
    """One request's place among the ``max_queue`` a device admits at once; :meth:`release`
    gives it back (idempotent, and safe from any thread)."""

    __slots__ = ("_released", "_worker")

    def __init__(self, worker: DeviceWorker) -> None:
        self._worker = worker
        self._released = False

    def release(self) -> None:
        worker = self._worker
        with worker._depth_lock:
            if self._released:
                return
            self._released = True
            worker._requests -= 1


class _Job:
    __slots__ = ("admission", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        admission: Admission | None,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.admission = admission


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DeviceWorker:
    """The thread that owns one device. ``submit`` from the event loop; await the future."""

    def __init__(
        self,
        device: Device,
        max_queue: int = 64,
        on_poison: Callable[[DeviceWorker], None] | None = None,
    ) -> None:
        self.device = device
        self.max_queue = max_queue
        self.poison_reason: str | None = None
        self._on_poison = on_poison
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._depth = 0
        self._requests = 0
        self._depth_lock = threading.Lock()
        self._stopped = False
        self.jobs_done = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=device.worker_name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.device.worker_name

    @property
    def poisoned(self) -> bool:
        return self.poison_reason is not None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting or running."""
        return self._depth

    @property
    def has_waiting_jobs(self) -> bool:
        """Another job is queued behind the running one. A job that runs several decode steps
        checks this between steps and hands the device over, so streams still take turns."""
        return self._depth > 1

    @property
    def requests_in_progress(self) -> int:
        """Requests admitted and not finished (what ``max_queue`` bounds)."""
        return self._requests

    def admit(self) -> Admission:
        """Admit one request, or raise at once (no waiting) when the worker is poisoned,
        stopped, or already has ``max_queue`` requests in progress. The caller submits the
        request's jobs with ``internal=True`` and releases the admission when it is over."""
        self._check_usable()
        with self._depth_lock:
            if self._requests >= self.max_queue:
                raise QueueFullError(
                    f"device {self.device.key} has {self._requests} requests in progress "
                    f"(max_queue {self.max_queue})"
                )
            self._requests += 1
        return Admission(self)

    def submit(self, fn: Callable[[], T], *, internal: bool = False) -> asyncio.Future[T]:
        """Queue ``fn`` to run on this device's thread; returns a future for its result.

        Raises at once (no waiting) when the worker is poisoned or stopped. A plain job is a
        request of its own (tokenise, a memory query): it is admitted like any request
        (:meth:`admit`, refused at ``max_queue``) and releases its place once it ran.
        ``internal`` jobs are never refused: the later jobs of an admitted request, and
        cleanup (closing a generation, unloading), which must never fail because clients
        filled the device.
        """
        if internal:
            self._check_usable()
            admission = None
        else:
            admission = self.admit()
        with self._depth_lock:
            self._depth += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future, admission))
        return future

    def _check_usable(self) -> None:
        if self.poison_reason is not None:
            raise DevicePoisonedError(
                f"device {self.device.key} is poisoned after a fault ({self.poison_reason}); "
                "restart the neuron to use it again"
            )
        if self._stopped:
            raise WorkerStoppedError(f"the worker of {self.device.key} is stopped")

    async def run(self, fn: Callable[[], T], *, internal: bool = False) -> T:
        """``await worker.run(fn)``: submit and wait."""
        return await self.submit(fn, internal=internal)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run_job(job)
            finally:
                with self._depth_lock:
                    self._depth -= 1
                if job.admission is not None:
                    job.admission.release()

    def _run_job(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        result: Any = None
        error: BaseException | None = None
        if self.poison_reason is not None:
            error = DevicePoisonedError(
                f"device {self.device.key} is poisoned after a fault ({self.poison_reason})"
            )
        else:
            started = time.perf_counter()
            try:
                result = job.fn()
            except DeviceFault as exc:
                error = exc
                self._poison(str(exc))
            except BaseException as exc:
                error = exc
            finally:
                self.busy_seconds += time.perf_counter() - started
                self.jobs_done += 1
        # a closed loop (shutdown) means nobody is waiting any more
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _poison(self, reason: str) -> None:
        log.error("device %s poisoned: %s", self.device.key, reason)
        self.poison_reason = reason
        if self._on_poison is not None:
            try:
                self._on_poison(self)
            except Exception:  # a callback must not kill the worker thread
                log.exception("on_poison callback failed")

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then end the thread."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout)


class WorkerPool:
    """The workers of this node, keyed by device key (``cpu``, ``cuda:0``)."""

    def __init__(self, workers: list[DeviceWorker]) -> None:
        self.workers = {w.device.key: w for w in workers}

    def get(self, key: str) -> DeviceWorker | None:
        return self.workers.get(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.workers.values())

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
