"""One OS thread per device that owns every operation on it: a job queue for one-off work and
the device's scheduler for generation.

Libraries like torch (CUDA contexts, streams) and llama.cpp (not thread-safe) are simplest and
safest when exactly one thread touches a device. Callers submit small callables (a load, a
chat template render, a memory query) and await an asyncio future; model objects and tensors
stay on the worker thread. Generation does not go through jobs: a request's first job adds its
generation to the device's :class:`~cortex.neuron.scheduler.Scheduler`, and while the scheduler
has work the thread alternates between the jobs queued by then and one scheduler iteration (a
batched step of every running generation). The tokens an iteration made go back to their
streams through an :class:`Outbox`: one cross-thread hand-off per iteration whatever the
number of streams, and fewer when the event loop is busy (outputs pile up in the outbox until
the loop takes them, so a fast model never waits for the loop).

``max_queue`` bounds *requests*, not jobs: a request is admitted once, at its first job (a
generation holds its :class:`Admission` until it ends), and the jobs it queues afterwards are
never refused. Bounding jobs instead refused a running stream's next job whenever other
requests had filled the queue, and cut an answer that had already started with a
``queue_full`` error mid-stream.

A :class:`~cortex.harness.DeviceFault` poisons the worker: it then fails every job and every
generation fast with :class:`DevicePoisonedError` instead of touching a broken context. Other
devices keep working.
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
from cortex.harness import DeviceFault, LoadedModel
from cortex.neuron.scheduler import DEFAULT_MAX_BATCH_TOKENS, Delivery, Scheduler
from cortex.wire.errors import ApiError

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


# Tokens of a fast model wait on the worker at most this long before they go to the event loop
# together: one hand-off (and one socket write per stream) per 4 ms instead of one per token.
# A first token, an end or an error goes at once, and so does everything once an iteration takes
# this long (a model slower than 4 ms a step hands off every token as it is made).
MAX_HANDOFF_DELAY_S = 0.004
# While generations run, queued jobs take at most about this long (or half the last iteration,
# if longer) between two iterations; a job that started always finishes, at least one runs.
JOBS_BUDGET_S = 0.002


class Outbox:
    """The scheduler's outputs for the streams of one event loop. The worker adds each
    iteration's outputs and sends when they are due; a send schedules one callback on the loop,
    which takes everything there is by then (so a loop that falls behind gets several
    iterations' outputs in one hand-off instead of a backlog of callbacks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[Delivery] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def add(self, items: list[Delivery]) -> None:
        with self._lock:
            self._items.extend(items)

    def send(self) -> None:
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        # a closed loop (shutdown) means nobody is waiting any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for sequence, output in items:
            try:
                sequence.sink.deliver(output)
            except Exception:  # one broken stream must not cost the others their tokens
                log.exception("delivering a generation's output failed")


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
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch: int = 32,
    ) -> None:
        self.device = device
        self.max_queue = max_queue
        self.poison_reason: str | None = None
        # Owned by the worker thread (the event loop only reads its counters).
        self.scheduler = Scheduler(max_batch_tokens=max_batch_tokens, default_max_batch=max_batch)
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}
        self._last_handoff = 0.0
        self._last_iteration_s = 0.0
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

    def outbox(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        """The outbox of ``loop`` (one per event loop the streams live on)."""
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = Outbox(loop)
        return outbox

    def _deliver(self, deliveries: list[Delivery], urgent: bool = True) -> None:
        """Queue outputs for their streams, and send what is due (see
        :data:`MAX_HANDOFF_DELAY_S`): everything when ``urgent`` or when an output starts or
        ends a generation."""
        if deliveries:
            loop = deliveries[0][0].sink.loop
            if all(sequence.sink.loop is loop for sequence, _ in deliveries):
                self.outbox(loop).add(deliveries)
            else:
                by_loop: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
                for delivery in deliveries:
                    by_loop.setdefault(delivery[0].sink.loop, []).append(delivery)
                for loop, items in by_loop.items():
                    self.outbox(loop).add(items)
            if not urgent:
                urgent = any(
                    output.ended or sequence.produced == len(output.results)
                    for sequence, output in deliveries
                )
        now = time.perf_counter()
        if urgent or now - self._last_handoff >= MAX_HANDOFF_DELAY_S:
            self._last_handoff = now
            for outbox in self._outboxes.values():
                outbox.send()

    def _run(self) -> None:
        scheduler = self.scheduler
        jobs = self._queue
        while True:
            if scheduler.has_work:
                # queued jobs first (new requests' prompts, memory queries), then one
                # iteration; while generations run, jobs get half an iteration's time (at
                # least JOBS_BUDGET_S, at least one job), so a burst of new requests rendering
                # their chat templates does not stall the running streams for all of them
                budget = max(JOBS_BUDGET_S, self._last_iteration_s / 2)
                deadline = time.perf_counter() + budget
                for _ in range(jobs.qsize()):
                    job = jobs.get_nowait()
                    if job is None:
                        self._shutdown()
                        return
                    self._do(job)
                    if time.perf_counter() >= deadline:
                        break
                self._iterate()
            else:
                self._deliver([])  # nothing may wait in an outbox while the worker sleeps
                job = jobs.get()
                if job is None:
                    self._shutdown()
                    return
                self._do(job)

    def _do(self, job: _Job) -> None:
        try:
            self._run_job(job)
        finally:
            with self._depth_lock:
                self._depth -= 1
            if job.admission is not None:
                job.admission.release()

    def _iterate(self) -> None:
        started = time.perf_counter()
        try:
            deliveries = self.scheduler.step()
        except DeviceFault as exc:
            self._poison(str(exc))
            deliveries = []
        except Exception as exc:  # a scheduler bug: end the generations, keep the device
            log.exception("scheduler iteration on %s failed", self.device.key)
            deliveries = self.scheduler.fail_all(exc)
        finally:
            self._last_iteration_s = time.perf_counter() - started
            self.busy_seconds += self._last_iteration_s
        self._deliver(deliveries, urgent=not self.scheduler.has_work)

    def _shutdown(self) -> None:
        stopped = WorkerStoppedError(f"the worker of {self.device.key} stopped")
        self._deliver(self.scheduler.fail_all(stopped, close=self.poison_reason is None))

    def retire(self, model: LoadedModel) -> None:
        """Unload ``model`` (a job: call it on the worker thread). Generations still running on
        it end first, with a retryable ``model_unloading`` error."""
        unloading = ApiError(
            503, "model_unloading", "the model was unloaded during the generation", retry_after=5
        )
        self._deliver(self.scheduler.drop_model(model, unloading))
        model.unload()

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
        poisoned = DevicePoisonedError(
            f"device {self.device.key} is poisoned after a fault ({reason})"
        )
        self._deliver(self.scheduler.fail_all(poisoned, close=False))
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

    def __iter__(self):
        return iter(self.workers.values())

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
