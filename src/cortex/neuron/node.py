"""Everything one neuron process holds: config, sources, harnesses, devices and their workers,
the model table and the metrics. Built once at start; the routes and the loader share it."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs

from cortex.config import DeviceSettings, NeuronConfig
from cortex.devices import Device, cuda_devices
from cortex.harness import Harness
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.models import FAILED, ModelTable
from cortex.neuron.workers import DeviceWorker, WorkerPool
from cortex.source_resolver import SourceResolver

log = logging.getLogger(__name__)

MIB = 2**20
# The exit status after a device fault (EX_TEMPFAIL: "try again"): not 0, so a supervisor with
# ``Restart=on-failure`` starts the neuron again.
EXIT_DEVICE_FAULT = 75


@attrs.define
class DefaultModelsProgress:
    """What ``/health`` reports about ``[[default_models]]``."""

    total: int = 0
    ready: int = 0
    failed: int = 0

    @property
    def pending(self) -> int:
        return self.total - self.ready - self.failed

    def to_json(self) -> dict[str, int]:
        return {
            "total": self.total,
            "ready": self.ready,
            "failed": self.failed,
            "pending": self.pending,
        }


@attrs.define
class Node:
    config: NeuronConfig
    resolver: SourceResolver
    harnesses: dict[str, Harness]
    devices: dict[str, Device]
    workers: WorkerPool
    models: ModelTable = attrs.field(factory=ModelTable)
    metrics: NeuronMetrics = attrs.field(factory=NeuronMetrics)
    name: str = attrs.field(factory=socket.gethostname)
    default_models: DefaultModelsProgress = attrs.field(factory=DefaultModelsProgress)
    draining: bool = False
    started: bool = False
    started_at: float = attrs.field(factory=time.time)
    unload_wait_seconds: float = 30.0
    # Recovery from a device fault (``on_device_fault``): the loop the node lives on (set at
    # start), how long other requests may take to finish, how to stop the server (set by
    # ``neuron run``), and the exit status the process ends with (None: a normal stop).
    loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, repr=False)
    drain_seconds: float = 30.0
    request_exit: Callable[[], None] | None = attrs.field(default=None, repr=False)
    exit_code: int | None = None
    restart_reason: str | None = None

    @classmethod
    def build(
        cls,
        config: NeuronConfig,
        harnesses: list[Harness],
        devices: list[Device],
        resolver: SourceResolver,
    ) -> Node:
        by_key: dict[str, Device] = {}
        for device in devices:
            settings = config.devices.get(device.key, DeviceSettings())
            if device.kind == "cpu" and settings.memory_mb is not None:
                budget = settings.memory_mb * MIB
                device = attrs.evolve(device, total_memory=budget, free_memory=budget)
            by_key[device.key] = device
        node = cls(
            config=config,
            resolver=resolver,
            harnesses={h.name: h for h in harnesses},
            devices=by_key,
            workers=WorkerPool([]),
            name=config.name or socket.gethostname(),
        )
        workers = []
        for key, device in by_key.items():
            settings = config.devices.get(key, DeviceSettings())
            workers.append(
                DeviceWorker(
                    device,
                    settings.max_queue,
                    on_poison=node._poisoned,
                    max_batch_tokens=settings.max_batch_tokens,
                    max_batch=settings.max_batch,
                )
            )
        node.workers = WorkerPool(workers)
        for worker in workers:
            rows = node.metrics.series(node.metrics.batch_rows, worker.device.key)
            worker.scheduler.on_batch = rows.observe
        return node

    def _poisoned(self, worker: DeviceWorker) -> None:
        """Called on the worker thread: mark its models failed (a plain attribute write), and
        with ``on_device_fault = "exit"`` start the restart on the event loop."""
        for entry in self.models.holding(worker.device.key):
            entry.fail(
                "device_poisoned",
                f"device {worker.device.key} is poisoned: {worker.poison_reason}",
            )
        if self.config.on_device_fault != "exit":
            log.error(
                "device %s is poisoned; serving the other devices until the neuron is restarted "
                'by hand (on_device_fault = "stay")',
                worker.device.key,
            )
            return
        reason = f"device {worker.device.key} faulted: {worker.poison_reason}"
        if self.loop is None or self.loop.is_closed():
            log.critical("%s; cannot restart from here (no event loop)", reason)
            return
        self.loop.call_soon_threadsafe(self.begin_restart, reason)

    # ---- recovery: exit for the service manager to start a fresh process -------------------

    def begin_restart(self, reason: str) -> asyncio.Task[None] | None:
        """On the event loop: stop taking work, let what runs on the other devices finish
        (at most ``drain_seconds``), then stop the server with :data:`EXIT_DEVICE_FAULT`.

        Why exit: a CUDA context that faulted cannot be trusted or reset from inside the
        process; a fresh process gets a fresh context, reloads ``[[default_models]]``, and the
        gateway reloads other models where it needs them. systemd (``Restart=on-failure``,
        deploy/neuron.service) or any supervisor restarts it. Until then ``/health`` says
        ``draining``, loads are refused and every model is ``failed`` with the reason, so
        gateways send new requests elsewhere; requests already running are not cut.
        """
        if self.exit_code is not None:
            return None  # a second device faulting: one restart is enough
        self.exit_code = EXIT_DEVICE_FAULT
        self.restart_reason = reason
        self.draining = True
        log.critical("%s; the neuron restarts once its other requests end", reason)
        for entry in self.models.all():
            if entry.state != FAILED:
                entry.fail("neuron_restarting", f"the neuron restarts: {reason}")
        return asyncio.get_running_loop().create_task(self._drain_then_exit(), name="restart")

    async def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while time.monotonic() < deadline and any(e.in_flight for e in self.models.all()):
            await asyncio.sleep(0.05)
        busy = sum(e.in_flight for e in self.models.all())
        log.critical(
            "exiting with status %d for a restart (%s)",
            EXIT_DEVICE_FAULT,
            f"{busy} request(s) still running are cut" if busy else "no request was cut",
        )
        if self.request_exit is not None:
            self.request_exit()
        else:
            log.error("no server to stop: restart this neuron by hand")

    # ---- memory ledger -------------------------------------------------------------------

    def budget(self, key: str) -> int:
        """The memory models may use on a device: its configured ``memory_mb`` or its total."""
        device = self.devices[key]
        settings = self.config.devices.get(key)
        if settings is not None and settings.memory_mb is not None:
            return min(settings.memory_mb * MIB, device.total_memory)
        return device.total_memory

    def used(self, key: str) -> int:
        return self.models.reserved_on(key)

    def free(self, key: str) -> int:
        """Budget minus what models hold or are loading; on CUDA also what the driver says."""
        free = self.budget(key) - self.used(key)
        device = self.devices[key]
        worker = self.workers.get(key)
        # never query a poisoned device: its context may be broken
        if device.kind == "cuda" and worker is not None and not worker.poisoned:
            live = self._live_cuda_free(device.index)
            if live is not None:
                loading = sum(
                    e.share_on(key)
                    for e in self.models.holding(key)
                    if e.state != FAILED and e.handle is None
                )
                free = min(free, live - loading)
        return max(0, free)

    @staticmethod
    def _live_cuda_free(index: int) -> int | None:
        try:
            for device in cuda_devices():
                if device.index == index:
                    return device.free_memory
        except Exception as exc:
            log.debug("live CUDA memory query failed: %s", exc)
        return None

    def device_json(self, key: str) -> dict[str, Any]:
        device = self.devices[key]
        worker = self.workers.get(key)
        return {
            "key": key,
            "kind": device.kind,
            "index": device.index,
            "name": device.name,
            "total_memory": self.budget(key),
            "free_memory": self.free(key),
            "compute_capability": device.compute_capability,
            "worker": device.worker_name,
            "state": "poisoned" if worker is not None and worker.poisoned else "ok",
            "poison_reason": worker.poison_reason if worker is not None else None,
            "queue_depth": worker.queue_depth if worker is not None else 0,
            "requests_in_progress": worker.requests_in_progress if worker is not None else 0,
            "max_queue": worker.max_queue if worker is not None else 0,
            # a secondary device of a multi-device model: no other model is placed here
            "reserved_by": reserved.id if (reserved := self.models.reserved_by(key)) else None,
        }

    def refresh_gauges(self) -> None:
        """Set the gauges ``/metrics`` reads at scrape time (devices, schedulers, models)."""
        metrics = self.metrics
        for key in self.devices:
            worker = self.workers.get(key)
            metrics.queue_depth.labels(key).set(worker.queue_depth if worker else 0)
            metrics.device_poisoned.labels(key).set(
                1 if worker is not None and worker.poisoned else 0
            )
            metrics.device_memory.labels(key, "total").set(self.budget(key))
            metrics.device_memory.labels(key, "used").set(self.used(key))
            metrics.device_memory.labels(key, "free").set(max(0, self.budget(key) - self.used(key)))
        metrics.refresh_schedulers(
            {entry.id: load for entry in self.models.all() if (load := entry.load()) is not None}
        )
        counts: dict[str, int] = {"loading": 0, "ready": 0, "failed": 0, "unloading": 0}
        for entry in self.models.all():
            counts[entry.state] = counts.get(entry.state, 0) + 1
        for state, count in counts.items():
            metrics.models.labels(state).set(count)
