"""Device workers: one named thread per device, FIFO jobs, a bounded queue, poisoning."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cortex.devices import Device
from cortex.harness import DeviceFault
from cortex.neuron.workers import DevicePoisonedError, DeviceWorker, QueueFullError


def device(kind: str = "cuda", index: int = 0) -> Device:
    return Device(kind, index, f"{kind}{index}", 2**30, 2**30)


def test_jobs_run_in_order_on_the_named_thread() -> None:
    worker = DeviceWorker(device("cuda", 1))

    async def main() -> list[str]:
        futures = [
            worker.submit(lambda i=i: f"{i}:{threading.current_thread().name}") for i in range(5)
        ]
        return list(await asyncio.gather(*futures))

    try:
        assert asyncio.run(main()) == [f"{i}:cuda-dev-1" for i in range(5)]
    finally:
        worker.stop()


def test_queue_bound_refuses_at_once_but_internal_jobs_pass() -> None:
    worker = DeviceWorker(device("cpu"), max_queue=2)
    release = threading.Event()

    async def main() -> None:
        blocked = [worker.submit(lambda: release.wait(10)) for _ in range(2)]
        assert worker.queue_depth == 2
        with pytest.raises(QueueFullError, match="max_queue 2"):
            worker.submit(lambda: None)
        cleanup = worker.submit(lambda: "closed", internal=True)
        release.set()
        await asyncio.gather(*blocked)
        assert await cleanup == "closed"

    try:
        asyncio.run(main())
        assert worker.queue_depth == 0
    finally:
        worker.stop()


def test_a_device_fault_poisons_the_worker_and_other_errors_do_not() -> None:
    poisoned: list[str] = []
    worker = DeviceWorker(device("cuda", 0), on_poison=lambda w: poisoned.append(w.name))
    healthy = DeviceWorker(device("cuda", 1))

    def fault() -> None:
        raise DeviceFault("CUDA error: device-side assert triggered")

    def bug() -> None:
        raise ValueError("a plain bug")

    async def main() -> None:
        with pytest.raises(ValueError):
            await worker.run(bug)
        assert not worker.poisoned
        with pytest.raises(DeviceFault):
            await worker.run(fault)
        assert worker.poisoned and poisoned == ["cuda-dev-0"]
        with pytest.raises(DevicePoisonedError, match="poisoned"):
            worker.submit(lambda: 1)
        assert await healthy.run(lambda: 42) == 42

    try:
        asyncio.run(main())
    finally:
        worker.stop()
        healthy.stop()


def test_jobs_queued_behind_a_fault_fail_fast() -> None:
    worker = DeviceWorker(device("cuda", 2))
    release = threading.Event()

    def fault() -> None:
        release.wait(10)
        raise DeviceFault("CUDA error: illegal memory access")

    ran: list[int] = []

    async def main() -> None:
        first = worker.submit(fault)
        later = worker.submit(lambda: ran.append(1))
        release.set()
        with pytest.raises(DeviceFault):
            await first
        with pytest.raises(DevicePoisonedError):
            await later

    try:
        asyncio.run(main())
        assert ran == []
    finally:
        worker.stop()


def test_admissions_bound_requests_and_their_later_jobs_are_never_refused() -> None:
    worker = DeviceWorker(device("cpu"), max_queue=1)

    async def main() -> None:
        admission = worker.admit()
        assert worker.requests_in_progress == 1
        with pytest.raises(QueueFullError, match="1 requests in progress"):
            worker.admit()
        with pytest.raises(QueueFullError):
            worker.submit(lambda: None)  # a plain job is a request of its own
        # the admitted request's jobs: as many as it needs, none refused
        results = await asyncio.gather(
            *(worker.submit(lambda i=i: i, internal=True) for i in range(5))
        )
        assert results == [0, 1, 2, 3, 4]
        admission.release()
        admission.release()  # idempotent: the place is given back once
        assert worker.requests_in_progress == 0
        assert await worker.submit(lambda: "next") == "next"
        assert worker.requests_in_progress == 0  # a plain job's place ends with it

    try:
        asyncio.run(main())
    finally:
        worker.stop()
