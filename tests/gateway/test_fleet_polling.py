"""The fleet poller: one poll loop per neuron, so a neuron that hangs delays no other, and is
down within ``down_after x (poll_interval + poll timeout)`` (docs/gateway.md, "The fleet view").

The neurons here are real HTTP servers on loopback (raw asyncio sockets) that answer
``/discovery`` and ``/models`` like a neuron, and can be switched to accept connections and read
requests but never answer: what a neuron whose process is stuck looks like from the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from cortex.config import NeuronRef
from cortex.gateway.fleet import Fleet

INTERVAL = 0.1
TIMEOUT = 1.0
DOWN_AFTER = 3
BOUND = DOWN_AFTER * (INTERVAL + TIMEOUT)  # the documented bound: 3.3 s here


class NeuronLike:
    """A loopback HTTP/1.1 server answering like a neuron until ``hanging`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hanging = False
        self.requests = 0
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> NeuronLike:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()

    def _answer(self, path: str) -> object:
        if path == "/discovery":
            return {
                "node": self.name,
                "default_source": "huggingface",
                "devices": [{"key": "cpu", "total_memory": 2**30, "free_memory": 2**30}],
                "harnesses": [{"name": "echo"}],
                "sources": [{"scheme": "huggingface"}],
            }
        return {"models": [{"id": f"huggingface:acme/{self.name}", "state": "ready"}]}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one GET (no body) after another
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.hanging:
                    await self._release.wait()  # accepted and read, never answered
                    return
                path = head.split(b" ", 2)[1].decode()
                body = json.dumps(self._answer(path)).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def polled(*names: str) -> AsyncIterator[tuple[Fleet, dict[str, NeuronLike]]]:
    servers = {name: await NeuronLike(name).start() for name in names}
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    fleet = Fleet(
        [NeuronRef(name, s.url) for name, s in servers.items()],
        session,
        poll_interval=INTERVAL,
        down_after=DOWN_AFTER,
        request_timeout=TIMEOUT,
    )
    try:
        await fleet.poll_all()
        assert all(node.up for node in fleet.nodes.values())
        yield fleet, servers
    finally:
        await fleet.stop()
        for server in servers.values():
            await server.stop()
        await session.close()


def test_a_hanging_neuron_delays_no_other_and_is_down_within_the_bound() -> None:
    async def scenario() -> None:
        async with polled("healthy", "stuck") as (fleet, servers):
            healthy, stuck = fleet.nodes["healthy"], fleet.nodes["stuck"]
            fleet.start()
            await asyncio.sleep(3 * INTERVAL)
            servers["stuck"].hanging = True
            began = time.monotonic()
            refreshes = [healthy.refreshed_at]
            while stuck.up and time.monotonic() - began < BOUND + 5:
                assert healthy.up
                if healthy.refreshed_at != refreshes[-1]:
                    refreshes.append(healthy.refreshed_at)
                await asyncio.sleep(0.01)
            took = time.monotonic() - began

            assert not stuck.up
            # Within the bound (plus a little scheduling), and debounced: each of the three
            # misses waited for the poll timeout, it was not the first slow answer.
            assert 2 * TIMEOUT <= took <= BOUND + 0.5, took
            assert stuck.health.last_error == f"TimeoutError: no answer within {TIMEOUT:g}s"
            assert stuck.health.failures == DOWN_AFTER
            # Meanwhile the healthy neuron kept its own rhythm: a poll every interval, never
            # one per hung poll of the other (which would be a gap of TIMEOUT + INTERVAL).
            gaps = [b - a for a, b in itertools.pairwise(refreshes)]
            assert len(refreshes) >= took / (INTERVAL + 0.1), refreshes
            assert max(gaps) < INTERVAL + 0.4, gaps

    asyncio.run(scenario())


def test_stop_cancels_every_poll_loop_hung_or_not() -> None:
    async def scenario() -> None:
        async with polled("healthy", "stuck") as (fleet, servers):
            servers["stuck"].hanging = True
            fleet.start()
            await asyncio.sleep(5 * INTERVAL)  # "stuck" is inside a hung poll now
            assert servers["stuck"].requests > 0
            started = time.monotonic()
            await fleet.stop()
            assert time.monotonic() - started < TIMEOUT / 2  # cancelled, not waited out
            seen = servers["healthy"].requests
            await asyncio.sleep(5 * INTERVAL)
            assert servers["healthy"].requests == seen  # nobody polls any more

    asyncio.run(scenario())


def test_a_refresh_beats_an_older_hung_poll() -> None:
    """``refresh`` (after a load or unload) still applies at once, and the older hung poll
    that fails later is dropped: it cannot count a miss against a fresher success."""

    async def scenario() -> None:
        async with polled("n") as (fleet, servers):
            node = fleet.nodes["n"]
            servers["n"].hanging = True
            hung = asyncio.create_task(fleet.refresh("n"))
            await asyncio.sleep(0.2)  # its requests are read, and will never be answered
            servers["n"].hanging = False
            await fleet.refresh("n")  # new connections: answered at once
            assert node.up and node.health.failures == 0
            fresh = node.refreshed_at
            await hung  # times out after TIMEOUT; started first, so dropped
            assert node.up and node.health.failures == 0 and node.health.last_error is None
            assert node.refreshed_at == fresh

    asyncio.run(scenario())
