"""The plain-ASGI generation routes (cortex.gateway.fast_path) answer exactly like the FastAPI
routes they short-cut: two gateways over the same neurons, one of them forced through FastAPI,
get the same requests -- good ones, streamed ones, and every kind of bad one -- and must give
the same status, error code, envelope, Retry-After and content."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from cortex.auth import GatewayAuth
from cortex.config import (
    AuthSection,
    CortexConfig,
    Duration,
    GatewaySection,
    ModelsConfig,
    NeuronRef,
)
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.servers import UvicornThread

KEY = "fast-path-key"
HELLO = [{"role": "user", "content": "hello"}]


class FrameworkOnly:
    """The same app without its short cut: every request goes through FastAPI."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(self.app, scope, receive, send)


@pytest.fixture
def two_gateways(fleet, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    model = fleet.publish_echo("acme/fast", reply="fast path reply", memory_mb=10)
    fleet.load_on("n1", model)
    urls = []
    for wrap in (lambda app: app, FrameworkOnly):
        config = CortexConfig(
            gateway=GatewaySection(poll_interval=Duration(0.2), retry_after=2, max_body_bytes=4096),
            auth=AuthSection(keys_env="CORTEX_TEST_FAST_KEYS"),
            neurons=[NeuronRef("n1", fleet.neuron_url("n1"))],
        )
        gateway = Gateway(config, ModelsConfig(), load_strategy("lru"))
        auth = GatewayAuth.from_config(config.auth, tmp_path, {"CORTEX_TEST_FAST_KEYS": KEY})
        server = UvicornThread(wrap(create_app(gateway, auth))).start()
        fleet.gateways.append(server)
        urls.append(server.url)
    yield urls[0], urls[1], model


def _cases(model: str) -> list[tuple[str, dict[str, str], bytes]]:
    good = {"model": model, "messages": HELLO, "max_tokens": 8}
    ask = {"model": model, "messages": HELLO, "max_tokens": 8}
    count = {"model": model, "messages": HELLO}
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    return [
        ("/v1/chat/completions", auth, json.dumps(good).encode()),
        ("/v1/completions", auth, json.dumps({"model": model, "prompt": "hi"}).encode()),
        ("/v1/chat/completions", {"x-api-key": KEY}, json.dumps(good).encode()),
        ("/v1/chat/completions", {}, json.dumps(good).encode()),  # no key: 401
        ("/v1/chat/completions", {"authorization": "Bearer wrong"}, json.dumps(good).encode()),
        ("/v1/chat/completions", auth, b"{not json"),
        ("/v1/chat/completions", auth, b""),
        ("/v1/chat/completions", auth, b"[1, 2]"),
        ("/v1/chat/completions", auth, b"\xff\xfe"),
        ("/v1/chat/completions", auth, b"x" * 5000),  # over max_body_bytes: 413
        ("/v1/chat/completions", auth, json.dumps({"messages": HELLO}).encode()),
        ("/v1/chat/completions", auth, json.dumps({**good, "model": "acme/nope"}).encode()),
        ("/v1/chat/completions", auth, json.dumps({**good, "model": "nope:x/y"}).encode()),
        ("/v1/completions", auth, json.dumps({**good, "model": 7}).encode()),
        ("/v1/messages", auth, json.dumps(ask).encode()),
        ("/v1/messages", {"x-api-key": KEY}, json.dumps(ask).encode()),
        ("/v1/messages", {}, json.dumps(ask).encode()),  # 401 in the Anthropic envelope
        ("/v1/messages", auth, b"{not json"),
        ("/v1/messages", auth, b"x" * 5000),
        ("/v1/messages", auth, json.dumps({"model": model, "messages": HELLO}).encode()),
        ("/v1/messages", auth, json.dumps({**ask, "model": "acme/nope"}).encode()),
        ("/v1/messages/count_tokens", auth, json.dumps(count).encode()),
        ("/v1/messages/count_tokens", auth, json.dumps({"messages": HELLO}).encode()),
        ("/v1/responses", auth, json.dumps({"model": model, "input": "hello"}).encode()),
        ("/v1/responses", auth, json.dumps({"model": model, "input": 5}).encode()),
        ("/v1/responses", {}, json.dumps({"model": model, "input": "hello"}).encode()),
    ]


def _normalised(answer: httpx.Response) -> dict[str, Any]:
    body = answer.json()
    if body.get("error"):
        shown: Any = {k: body["error"].get(k) for k in ("type", "code", "param")}
    elif "choices" in body:  # ids and timestamps differ between two answers
        shown = [c.get("message", c.get("text")) for c in body["choices"]], body["usage"]
    elif body.get("type") == "message":
        shown = body["content"], body["usage"], body["stop_reason"]
    elif body.get("object") == "response":
        shown = body["output"][-1]["content"], body["status"]
    else:
        shown = body
    headers = {k: answer.headers.get(k) for k in ("retry-after", "www-authenticate", "connection")}
    return {"status": answer.status_code, "body": shown, "headers": headers}


def test_fast_path_answers_like_the_framework(two_gateways) -> None:
    fast, framework, model = two_gateways
    for path, headers, body in _cases(model):
        answers = [
            _normalised(httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30))
            for url in (fast, framework)
        ]
        assert answers[0] == answers[1], (path, headers, body[:60])


def test_fast_path_streams_like_the_framework(two_gateways) -> None:
    fast, framework, model = two_gateways
    request = {"model": model, "messages": HELLO, "max_tokens": 8, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    texts = []
    for url in (fast, framework):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=request, headers=headers, timeout=30
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            assert answer.headers["x-cortex-node"] == "n1"
            lines = [line for line in answer.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all("usage" not in c for c in chunks)  # the client did not ask for usage
        texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))
    assert texts[0] == texts[1] == "fast path reply"


def test_a_chunked_body_over_the_limit_is_cut_on_the_fast_path(two_gateways) -> None:
    fast, _framework, _model = two_gateways

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b" " * 1024

    try:
        answer = httpx.post(
            f"{fast}/v1/chat/completions",
            content=chunks(),
            headers={"authorization": f"Bearer {KEY}"},
            timeout=30,
        )
    except httpx.HTTPError:
        pytest.skip("the server closed before the client finished sending (allowed)")
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert answer.headers["connection"] == "close"


def test_fast_path_streams_messages_like_the_framework(two_gateways) -> None:
    fast, framework, model = two_gateways
    request = {"model": model, "messages": HELLO, "max_tokens": 8, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    events = []
    for url in (fast, framework):
        with httpx.stream(
            "POST", f"{url}/v1/messages", json=request, headers=headers, timeout=30
        ) as answer:
            assert answer.status_code == 200
            names = [line[7:] for line in answer.iter_lines() if line.startswith("event: ")]
        events.append([n for n in names if n != "ping"])
    assert events[0] == events[1]
    assert events[0][0] == "message_start" and events[0][-1] == "message_stop"
