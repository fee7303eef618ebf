"""Requests during an operator's unload (issue 22): a request that arrives while
``/admin/models/unload`` runs goes to another replica (or loads the model again), never to the
copy being unloaded (which answered 409)."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx

from cortex.config import ModelProfile

from .conftest import ECHO, load

HELLO = [{"role": "user", "content": "hello"}]


def test_requests_during_admin_unloads_all_succeed(parts) -> None:
    n1, n2 = parts.neuron("n1"), parts.neuron("n2")
    for neuron in (n1, n2):
        load(neuron.url, ECHO)
    gw = parts.gateway(
        {"n1": n1.url, "n2": n2.url},
        models=[ModelProfile(id=ECHO, memory_mb=10)],
        poll_interval="5s",  # the view goes stale between polls: only the gateway's own marks help
    )
    gw.wait_for(lambda: gw.node_up("n1") and gw.node_up("n2"), timeout=15)
    gw.wait_for(lambda: ECHO in gw.catalogue(), timeout=15)

    async def scenario() -> list[tuple[int, str]]:
        answers: list[tuple[int, str]] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def client() -> None:
                while not stop.is_set():
                    body = {"model": ECHO, "messages": HELLO}
                    async with session.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                        answers.append((r.status, await r.text()))

            async def operator() -> None:
                for _ in range(8):
                    for path in ("unload", "load"):
                        async with session.post(
                            f"{gw.url}/admin/models/{path}", json={"model": ECHO, "node": "n1"}
                        ) as r:
                            assert r.status == 200, await r.text()
                stop.set()

            await asyncio.gather(operator(), *(client() for _ in range(8)))
        return answers

    answers = asyncio.run(scenario())
    failed = [a for a in answers if a[0] != 200]
    assert len(answers) > 50 and not failed, (len(answers), failed[:3])
    assert httpx.get(f"{gw.url}/admin/status").json()["failed_loads"] == {}


def test_a_model_unloaded_behind_the_gateways_back_is_served_elsewhere(parts) -> None:
    """Another gateway (or an operator on the neuron) unloads a copy: until the next poll this
    gateway's view is stale; the neuron's 'not loaded here' sends the request to another
    replica instead of to the client."""
    n1, n2 = parts.neuron("n1"), parts.neuron("n2")
    for neuron in (n1, n2):
        load(neuron.url, ECHO)
    gw = parts.gateway({"n1": n1.url, "n2": n2.url}, poll_interval="60s")
    gw.wait_for(lambda: gw.node_up("n1") and gw.node_up("n2"), timeout=15)
    gw.wait_for(lambda: ECHO in gw.catalogue(), timeout=15)
    answer = httpx.post(f"{n1.url}/models/unload", json={"model_id": ECHO}, timeout=30)
    assert answer.status_code == 200, answer.text
    for _ in range(10):  # least busy alternates: n1 is picked at least once while stale
        reply = httpx.post(
            f"{gw.url}/v1/chat/completions", json={"model": ECHO, "messages": HELLO}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-cortex-node"] == "n2"
