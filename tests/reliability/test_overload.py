"""Overload: bounded per-model queues (429 + Retry-After when full, 503 after queue_timeout),
a per-node bound (503 + Retry-After), and cancelled waiters that give their slots back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from .conftest import SLOW, load

QUICK = {"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
LONG = {"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def slow_neuron(parts):
    neuron = parts.neuron("n1")
    load(neuron.url, SLOW)
    return neuron


async def wait_until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, Any]:
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def test_cancelled_waiters_free_their_slots(parts, slow_neuron) -> None:
    gw = parts.gateway({"n1": slow_neuron.url}, max_in_flight_per_model=1, model_queue_size=100)
    gate = gw.gateway.admission.gate(SLOW)

    async def scenario() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            # One long stream holds the only slot.
            holder = await session.post(f"{gw.url}/v1/chat/completions", json=LONG)
            assert holder.status == 200
            await holder.content.readline()
            assert gate.active == 1

            # 100 waiters fill the queue; one more is refused at once.
            waiters = [asyncio.create_task(post(session, gw.url, QUICK)) for _ in range(100)]
            await wait_until(lambda: gate.waiting == 100)
            status, headers, body = await post(session, gw.url, QUICK)
            assert status == 429 and int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "model_queue_full"
            assert body["error"]["type"] == "rate_limit_error"

            # The clients give up: their places are freed, none is left holding one.
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            await wait_until(lambda: gate.waiting == 0 and len(gate.waiters) == 0)
            assert gate.active == 1

            # Full capacity again: 100 new waiters fit, the 101st does not ...
            again = [asyncio.create_task(post(session, gw.url, QUICK)) for _ in range(100)]
            await wait_until(lambda: gate.waiting == 100)
            status, _headers, _body = await post(session, gw.url, QUICK)
            assert status == 429
            # ... and once the holder ends, every one of them is served.
            holder.close()
            results = await asyncio.wait_for(asyncio.gather(*again), 120)
            assert [r[0] for r in results] == [200] * 100
            assert all(r[2]["choices"][0]["message"]["content"] == "w0" for r in results)
            await wait_until(lambda: gate.active == 0 and gate.waiting == 0)

    asyncio.run(scenario())


def test_queue_timeout_and_per_node_limit(parts, slow_neuron) -> None:
    timed = parts.gateway({"n1": slow_neuron.url}, max_in_flight_per_model=1, queue_timeout=0.5)
    per_node = parts.gateway({"n1": slow_neuron.url}, max_in_flight_per_node=1)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            for gw, status, code in (
                (timed, 503, "queue_timeout"),
                (per_node, 503, "nodes_at_capacity"),
            ):
                holder = await session.post(f"{gw.url}/v1/chat/completions", json=LONG)
                await holder.content.readline()
                started = time.monotonic()
                got, headers, body = await post(session, gw.url, QUICK)
                assert (got, body["error"]["code"]) == (status, code), body
                assert int(headers["Retry-After"]) >= 1
                assert time.monotonic() - started < 5
                holder.close()
                # Capacity comes back once the holder is gone.
                await wait_until(lambda gw=gw: gw.gateway.usage.node_busy("n1") == 0)
                got, _headers, body = await post(session, gw.url, QUICK)
                assert got == 200, body

    asyncio.run(scenario())
