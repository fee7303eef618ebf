"""Overload: bounded per-model queues (429 + Retry-After when full, 503 after queue_timeout),
a per-node bound (503 + Retry-After), and cancelled waiters that give their slots back."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from cortex.gateway.admission import HOLD_UNTIL
from cortex.gateway.proxy import answer_ended, open_upstream

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
    gate = gw.gateway.scheduler.admission.gate(SLOW)

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
                await wait_until(lambda gw=gw: gw.gateway.scheduler.usage.node_busy("n1") == 0)
                got, _headers, body = await post(session, gw.url, QUICK)
                assert got == 200, body

    asyncio.run(scenario())


# ---- a neuron whose own queue is full (issue 22) ------------------------------------------------


def small_neuron(parts, max_queue: int):
    neuron = parts.neuron("n1", devices={"cpu": {"memory_mb": 1024, "max_queue": max_queue}})
    load(neuron.url, SLOW)
    return neuron


async def stream_all(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, str]:
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.text()


def test_the_gateway_holds_what_a_full_neuron_cannot_take_yet(parts) -> None:
    """40 streams for a neuron that runs 4 at a time: the gateway's bounds are far from reached,
    so every client is served; the neuron's 503 queue_full never reaches one."""
    neuron = small_neuron(parts, max_queue=4)
    gw = parts.gateway({"n1": neuron.url})
    body = {**LONG, "max_tokens": 8}

    async def scenario() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            # The neuron alone refuses most of a burst like this one (the reason to hold).
            direct = await asyncio.gather(
                *(stream_all(session, neuron.url, body) for _ in range(40))
            )
            assert sum(1 for status, _ in direct if status == 503) >= 20
            return await asyncio.gather(*(stream_all(session, gw.url, body) for _ in range(40)))

    results = asyncio.run(scenario())
    assert [status for status, _ in results] == [200] * 40, [r for r in results if r[0] != 200][:2]
    assert all("w7" in text and "[DONE]" in text for _, text in results)
    assert gw.metric("cortex_request_errors_total", route="/v1/chat/completions") == 0
    assert gw.gateway.scheduler.usage.node_busy("n1") == 0


def test_held_requests_are_refused_once_the_queue_timeout_is_spent(parts) -> None:
    neuron = small_neuron(parts, max_queue=1)
    gw = parts.gateway({"n1": neuron.url}, queue_timeout=0.6)

    async def scenario() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            holder = await session.post(f"{gw.url}/v1/chat/completions", json=LONG)  # ~5 s
            await holder.content.readline()
            started = time.monotonic()
            status, headers, body = await post(session, gw.url, QUICK)
            waited = time.monotonic() - started
            assert status == 503 and body["error"]["code"] == "queue_full", body
            assert int(headers["Retry-After"]) >= 1
            assert 0.5 <= waited < 5, waited  # held for the budget, then refused
            # Held clients that leave are dropped at once and hold nothing.
            held = [asyncio.create_task(post(session, gw.url, QUICK)) for _ in range(5)]
            await asyncio.sleep(0.3)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await wait_until(lambda: gw.gateway.scheduler.usage.node_busy("n1") == 1, timeout=5)
            holder.close()
            await wait_until(lambda: gw.gateway.scheduler.usage.node_busy("n1") == 0)
            status, _headers, body = await post(session, gw.url, QUICK)
            assert status == 200, body

    asyncio.run(scenario())


def test_held_whole_answers_are_sent_as_the_neuron_frees_room_not_one_at_a_time(parts) -> None:
    """Whole (non-streamed) answers: the neuron's answer headers come only when the whole answer
    is generated, so a held request must not keep the holding turn until then (it did: held
    requests were sent one at a time, 32 held half-second answers took 16 s and the budget below
    refused a third of them). Held requests fill every room the neuron frees, so 40 answers at 8
    at a time take about five rounds, far inside the budget."""
    neuron = small_neuron(parts, max_queue=8)
    gw = parts.gateway({"n1": neuron.url}, queue_timeout=10)
    body = {**QUICK, "max_tokens": 20}  # 0.5 s each at 40 words a second

    async def scenario() -> list[tuple[int, dict, Any]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            direct = await asyncio.gather(*(post(session, neuron.url, body) for _ in range(40)))
            assert sum(1 for status, _, _ in direct if status == 503) >= 20
            return await asyncio.gather(*(post(session, gw.url, body) for _ in range(40)))

    results = asyncio.run(scenario())
    refused = [r[2] for r in results if r[0] != 200]
    assert not refused, (len(refused), refused[:1])
    words = " ".join(f"w{i}" for i in range(20))
    assert all(r[2]["choices"][0]["message"]["content"] == words for r in results)
    assert gw.metric("cortex_request_errors_total", route="/v1/chat/completions") == 0
    assert gw.gateway.scheduler.usage.node_busy("n1") == 0


def test_count_tokens_is_held_too_while_the_neuron_is_full(parts) -> None:
    """count_tokens skips the model's queue (it must not wait behind generations), but a full
    neuron refuses it like a generation: it is held within the same budget, not refused."""
    neuron = small_neuron(parts, max_queue=2)
    gw = parts.gateway({"n1": neuron.url})
    count = {"model": SLOW, "messages": [{"role": "user", "content": "how many tokens?"}]}

    async def scenario() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            streams = [
                await session.post(f"{gw.url}/v1/chat/completions", json={**LONG, "max_tokens": 80})
                for _ in range(2)
            ]
            for stream in streams:  # both running: the neuron is full for about 2 s
                assert stream.status == 200
                await stream.content.readline()
            async with session.post(f"{neuron.url}/tokenize", json=count) as r:
                refused = await r.json()  # the neuron alone refuses it now (the reason to hold)
                assert r.status == 503 and refused["error"]["code"] == "queue_full", refused
            async with session.post(f"{gw.url}/v1/messages/count_tokens", json=count) as r:
                answer = await r.json()
                assert r.status == 200, answer
                assert answer["input_tokens"] > 0
            for stream in streams:
                assert "[DONE]" in await stream.text()

    asyncio.run(scenario())
    assert gw.gateway.scheduler.usage.node_busy("n1") == 0


def test_a_held_request_cancelled_after_the_neuron_took_it_leaves_nothing_behind(parts) -> None:
    """A held whole request waits for its answer outside the holding turn, as a task of its
    own; cancelling the request (its handler ends) must cancel that POST and so close its
    connection, which stops the neuron at once, not leave it generating for nobody (the
    answers here are 5 s long: left running, the neuron stays busy 4.5 s more)."""
    neuron = small_neuron(parts, max_queue=2)
    url = f"{neuron.url}/v1/chat/completions"
    whole = json.dumps({**QUICK, "max_tokens": 200}).encode()  # 5 s
    stream = json.dumps({**LONG, "max_tokens": 8}).encode()
    timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=30)

    def in_flight() -> int:
        return sum(entry.in_flight for entry in neuron.node.models.all())

    async def scenario() -> None:
        HOLD_UNTIL.set(time.monotonic() + 60)  # what admission gives a request
        async with aiohttp.ClientSession() as session:

            def send(body: bytes) -> asyncio.Future[aiohttp.ClientResponse]:
                return asyncio.ensure_future(open_upstream(session, url, body, {}, timeout, 2))

            fillers = [await send(stream) for _ in range(2)]  # the neuron is full
            held = [send(whole) for _ in range(2)]
            await asyncio.sleep(0.3)  # refused and held
            assert not any(task.done() for task in held)
            for filler in fillers:
                await filler.read()
                filler.close()
                answer_ended(url)  # the gateway's relay says so when an answer ends
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in held)
            async with session.post(url, json=QUICK) as resp:  # the fillers are over ...
                assert resp.status == 503  # ... and the neuron is full: it took the held two
            assert in_flight() == 2
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await wait_until(lambda: in_flight() == 0, timeout=2.5)

    asyncio.run(scenario())
