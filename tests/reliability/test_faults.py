"""Faults on loopback: a neuron killed mid-stream, a neuron that hangs, a gateway restarted
while neurons serve. Real ``neuron run`` processes where a process must die."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cortex.config import ModelProfile
from cortex.testing.servers import UvicornThread

from .conftest import ECHO, SLOW, load, wait_for

HELLO = [{"role": "user", "content": "hello"}]
ROUTE = "/v1/chat/completions"


def client(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kwargs)


def test_neuron_killed_mid_stream(parts) -> None:
    p1, p2 = parts.neuron_process("p1"), parts.neuron_process("p2")
    for proc in (p1, p2):
        load(proc.url, SLOW)
    gw = parts.gateway({"p1": p1.url, "p2": p2.url})
    raw = client(gw.url, timeout=30).chat.completions.with_raw_response.create(
        model=SLOW, messages=HELLO, stream=True
    )
    serving = raw.headers["x-cortex-node"]
    victim, survivor = (p1, p2) if serving == "p1" else (p2, p1)
    other = "p2" if serving == "p1" else "p1"
    stream = raw.parse()
    got = [next(iter(stream)) for _ in range(3)]
    assert got[-1].choices[0].delta.content
    victim.kill()
    with pytest.raises(openai.APIError) as info:
        for _chunk in stream:
            pass
    # A well-formed error at the end of the stream (an OpenAI error chunk the SDK raises).
    assert "neuron connection broke" in str(info.value.message)
    # Counted as failed, then the node is marked down after the debounce (2 failed polls).
    wait_for(lambda: gw.metric("cortex_requests_total", route=ROUTE, model=SLOW, status="error"))
    assert (
        gw.metric("cortex_request_errors_total", route=ROUTE, code="upstream_connection_error") == 1
    )
    wait_for(lambda: not gw.node_up(serving), what="node marked down")
    assert gw.metric("cortex_node_up", node=serving) == 0
    # New requests go to the other replica.
    for _ in range(3):
        reply = client(gw.url).chat.completions.with_raw_response.create(
            model=SLOW, messages=HELLO, max_tokens=2
        )
        assert reply.headers["x-cortex-node"] == other
        assert reply.parse().choices[0].message.content == "w0 w1"
    # With no replica left: 503 + Retry-After.
    survivor.kill()
    wait_for(lambda: not gw.node_up(other), what="second node marked down")
    answer = httpx.post(f"{gw.url}{ROUTE}", json={"model": SLOW, "messages": HELLO}, timeout=30)
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.json()["error"]["type"] == "service_unavailable_error"


def test_neuron_killed_mid_stream_anthropic(parts) -> None:
    p1 = parts.neuron_process("p1")
    load(p1.url, SLOW)
    gw = parts.gateway({"p1": p1.url})
    api = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=30)
    with api.messages.stream(model=SLOW, max_tokens=500, messages=HELLO) as stream:
        events = stream.__iter__()
        for _ in range(4):
            next(events)
        p1.kill()
        with pytest.raises(anthropic.APIError):
            for _event in events:
                pass


# ---- a neuron that hangs -----------------------------------------------------------------------


def hanging_neuron(discovery: dict[str, Any], models: dict[str, Any]) -> FastAPI:
    """Answers the poller like a healthy neuron, then never answers a generation (or stalls a
    stream after its first chunk when the prompt says ``stall``)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/discovery")
    async def get_discovery() -> JSONResponse:
        return JSONResponse(discovery)

    @app.get("/models")
    async def get_models() -> JSONResponse:
        return JSONResponse(models)

    @app.post(ROUTE)
    async def chat(request: Request) -> Response:
        body = await request.json()
        if body["messages"][-1]["content"] != "stall":
            await asyncio.sleep(3600)

        async def one_chunk_then_nothing() -> AsyncIterator[bytes]:
            yield b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
            yield b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
            await asyncio.sleep(3600)

        return StreamingResponse(one_chunk_then_nothing(), media_type="text/event-stream")

    return app


def test_hanging_neuron_gets_504_and_the_gateway_keeps_serving(parts) -> None:
    real = parts.neuron("n1")
    load(real.url, ECHO)
    discovery = httpx.get(f"{real.url}/discovery").json()
    models = httpx.get(f"{real.url}/models").json()
    hang = UvicornThread(hanging_neuron(discovery, models)).start()
    parts.stoppers.append(hang.stop)
    gw = parts.gateway({"hang": hang.url}, idle_timeout=1.0)
    wait_for(lambda: gw.node_up("hang"))

    started = time.monotonic()
    answer = httpx.post(f"{gw.url}{ROUTE}", json={"model": ECHO, "messages": HELLO}, timeout=30)
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert answer.headers["retry-after"]
    assert time.monotonic() - started < 8

    # A stream that stalls after its first chunk ends with an error chunk, not a hang.
    stream = client(gw.url, timeout=30).chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": "stall"}], stream=True
    )
    with pytest.raises(openai.APIError) as info:
        for _chunk in stream:
            pass
    assert "idle timeout" in str(info.value.message)
    # The gateway answered its own routes all along, and counted both failures.
    assert httpx.get(f"{gw.url}/health", timeout=2).status_code == 200
    assert gw.metric("cortex_requests_total", route=ROUTE, model=ECHO, status="error") >= 1


# ---- a gateway restarted while neurons serve ---------------------------------------------------


def test_restarted_gateway_serves_loaded_models_without_reloading(parts) -> None:
    neuron = parts.neuron("n1")
    profile = [ModelProfile(id="acme/echo", memory_mb=10)]
    first = parts.gateway({"n1": neuron.url}, models=profile)
    reply = client(first.url).chat.completions.create(model="acme/echo", messages=HELLO)
    assert reply.choices[0].message.content == "hello"
    assert (
        sum(first.metric("cortex_cold_loads_total", node="n1", outcome=o) for o in ("ok", "failed"))
        == 1
    )
    loaded_at = httpx.get(f"{neuron.url}/models").json()["models"][0]["loaded_at"]
    first.server.stop()

    second = parts.gateway({"n1": neuron.url}, models=profile)
    listed = {m.id: m.model_dump() for m in client(second.url).models.list().data}
    assert listed[ECHO]["state"] == "ready"
    reply = client(second.url).chat.completions.create(model="acme/echo", messages=HELLO)
    assert reply.choices[0].message.content == "hello"
    assert second.metric("cortex_cold_loads_total", node="n1", outcome="ok") == 0
    assert httpx.get(f"{neuron.url}/models").json()["models"][0]["loaded_at"] == loaded_at


def test_requests_sent_while_a_neuron_dies_go_to_another_replica(parts) -> None:
    """Requests that reach a dying neuron before any answer byte came back (a refused connection,
    a pooled keep-alive connection that turned out dead) are sent to another replica, not
    failed: with quick answers, none of 96 requests around a SIGKILL may fail."""
    p1, p2 = parts.neuron_process("p1"), parts.neuron_process("p2")
    for proc in (p1, p2):
        load(proc.url, ECHO)
    # A long poll interval: the gateway still believes p1 is up after it died.
    gw = parts.gateway({"p1": p1.url, "p2": p2.url}, poll_interval=60.0)
    body = {"model": ECHO, "messages": HELLO}

    def one(_i: int) -> str:
        return httpx.post(f"{gw.url}{ROUTE}", json=body, timeout=30).headers["x-cortex-node"]

    # Warm the pool: concurrent requests leave keep-alive connections to both neurons.
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(32))) == {"p1", "p2"}

    def answer(_i: int) -> httpx.Response:
        return httpx.post(f"{gw.url}{ROUTE}", json=body, timeout=30)

    # Keep requests flowing while p1 dies: some are on their way over pooled connections.
    with ThreadPoolExecutor(16) as pool:
        running = [pool.submit(answer, i) for i in range(64)]
        time.sleep(0.05)
        p1.kill()
        answers = [f.result() for f in running]
        answers += list(pool.map(answer, range(32)))
    assert [a.status_code for a in answers] == [200] * len(answers), [
        a.text for a in answers if a.status_code != 200
    ]


# ---- a neuron that closes a keep-alive connection as a request arrives on it -------------------


class ClosingNeuron:
    """An aiohttp server (aiohttp, because an ASGI app cannot close its connection) that answers
    the poller like a healthy neuron and closes, unanswered, the first generation request that
    arrives on a connection that already served a request: what the gateway sees when a
    neuron's keep-alive timer fires as the gateway reuses that connection."""

    def __init__(self, discovery: dict[str, Any], models: dict[str, Any]) -> None:
        self.discovery, self.models = discovery, models
        self.dropped = 0
        self.answered = 0
        self._served: list[Any] = []  # transports that answered once (held: ids stay unique)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _app(self) -> web.Application:
        @web.middleware
        async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
            response = await handler(request)
            self._served.append(request.transport)
            return response

        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not self.dropped and any(t is request.transport for t in self._served):
                self.dropped += 1
                assert request.transport is not None
                request.transport.close()
                return web.Response()  # never written: the connection is gone
            self.answered += 1
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def discovery(_request: web.Request) -> web.Response:
            return web.json_response(self.discovery)

        async def models(_request: web.Request) -> web.Response:
            return web.json_response(self.models)

        app = web.Application(middlewares=[remember])
        app.router.add_get("/health", health)
        app.router.add_get("/discovery", discovery)
        app.router.add_get("/models", models)
        app.router.add_post(ROUTE, chat)
        return app

    def start(self) -> ClosingNeuron:
        async def begin() -> str:
            self._runner = web.AppRunner(self._app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            return f"http://127.0.0.1:{port}"

        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.url = asyncio.run_coroutine_threadsafe(begin(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_a_keep_alive_connection_closed_under_a_request_is_sent_again(parts) -> None:
    """The only replica closing a pooled connection as a request arrives is not the neuron being
    down: the gateway sends the request once more on another connection, the client sees 200
    (it was a 502 "Can not write request body" in the gateway benchmark)."""
    real = parts.neuron("n1")
    load(real.url, ECHO)
    discovery = httpx.get(f"{real.url}/discovery").json()
    models = httpx.get(f"{real.url}/models").json()
    closing = ClosingNeuron(discovery, models).start()
    parts.stoppers.append(closing.stop)
    gw = parts.gateway({"closing": closing.url})
    wait_for(lambda: gw.node_up("closing"))

    openai_client = client(gw.url, timeout=30)
    for _ in range(4):  # every request after the poller's first one finds a pooled connection
        reply = openai_client.chat.completions.create(model=ECHO, messages=HELLO)
        assert reply.choices[0].message.content == "hello"
    assert closing.dropped == 1
    assert closing.answered == 4
    assert gw.metric("cortex_requests_total", route=ROUTE, model=ECHO, status="ok") == 4
