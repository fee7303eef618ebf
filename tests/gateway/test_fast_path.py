"""The plain-ASGI generation routes (cortex.gateway.fast_path) are the only way into the
generation paths, and answer as the FastAPI routes they replaced did: every case below -- good
ones, streamed ones, and every kind of bad one -- gives the status, error code, envelope,
Retry-After and content recorded from the FastAPI routes (the two were compared side by side
until the FastAPI routes were removed: issue 21). Under a ``root_path``, with another method and
in the OpenAPI document they behave as FastAPI routes would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
from cortex.gateway.routes import GENERATION_ROUTES
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.servers import UvicornThread

KEY = "fast-path-key"
HELLO = [{"role": "user", "content": "hello"}]


def _gateway(fleet, tmp_path: Path) -> tuple[Gateway, GatewayAuth]:
    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(0.2), retry_after=2, max_body_bytes=4096),
        auth=AuthSection(keys_env="CORTEX_TEST_FAST_KEYS"),
        neurons=[NeuronRef("n1", fleet.neuron_url("n1"))],
    )
    gateway = Gateway(config, ModelsConfig(), load_strategy("lru"))
    auth = GatewayAuth.from_config(config.auth, tmp_path, {"CORTEX_TEST_FAST_KEYS": KEY})
    return gateway, auth


@pytest.fixture
def served(fleet, tmp_path: Path) -> Iterator[tuple[str, str]]:
    model = fleet.publish_echo("acme/fast", reply="fast path reply", memory_mb=10)
    fleet.load_on("n1", model)
    server = UvicornThread(create_app(*_gateway(fleet, tmp_path))).start()
    fleet.gateways.append(server)
    yield server.url, model


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


# What the FastAPI routes answered to each of _cases(), in order: (status, body, headers).
RECORDED: list[tuple[int, Any, dict[str, str]]] = [
    (
        200,
        [
            [{"role": "assistant", "content": "fast path reply", "refusal": None}],
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        ],
        {},
    ),
    (
        200,
        [["fast path reply"], {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}],
        {},
    ),
    (
        200,
        [
            [{"role": "assistant", "content": "fast path reply", "refusal": None}],
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        ],
        {},
    ),
    (
        401,
        {"type": "authentication_error", "code": "invalid_api_key", "param": None},
        {"www-authenticate": "Bearer"},
    ),
    (
        401,
        {"type": "authentication_error", "code": "invalid_api_key", "param": None},
        {"www-authenticate": "Bearer"},
    ),
    (400, {"type": "invalid_request_error", "code": "invalid_json", "param": None}, {}),
    (400, {"type": "invalid_request_error", "code": "invalid_json", "param": None}, {}),
    (400, {"type": "invalid_request_error", "code": "invalid_json", "param": None}, {}),
    (400, {"type": "invalid_request_error", "code": "invalid_json", "param": None}, {}),
    (
        413,
        {"type": "invalid_request_error", "code": "request_too_large", "param": None},
        {"connection": "close"},
    ),
    (400, {"type": "invalid_request_error", "code": "missing_model_field", "param": "model"}, {}),
    (404, {"type": "not_found_error", "code": "model_not_found", "param": "model"}, {}),
    (404, {"type": "not_found_error", "code": "model_not_found", "param": "model"}, {}),
    (400, {"type": "invalid_request_error", "code": "missing_model_field", "param": "model"}, {}),
    (
        200,
        [
            [{"type": "text", "text": "fast path reply"}],
            {"input_tokens": 3, "output_tokens": 4},
            "end_turn",
        ],
        {},
    ),
    (
        200,
        [
            [{"type": "text", "text": "fast path reply"}],
            {"input_tokens": 3, "output_tokens": 4},
            "end_turn",
        ],
        {},
    ),
    (
        401,
        {"type": "authentication_error", "code": None, "param": None},
        {"www-authenticate": "Bearer"},
    ),
    (400, {"type": "invalid_request_error", "code": None, "param": None}, {}),
    (413, {"type": "request_too_large", "code": None, "param": None}, {"connection": "close"}),
    (400, {"type": "invalid_request_error", "code": None, "param": None}, {}),
    (404, {"type": "not_found_error", "code": None, "param": None}, {}),
    (200, {"input_tokens": 3}, {}),
    (400, {"type": "invalid_request_error", "code": None, "param": None}, {}),
    (
        200,
        [
            [{"type": "output_text", "text": "fast path reply", "annotations": [], "logprobs": []}],
            "completed",
        ],
        {},
    ),
    (400, {"type": "invalid_request_error", "code": "invalid_request", "param": "input"}, {}),
    (
        401,
        {"type": "authentication_error", "code": "invalid_api_key", "param": None},
        {"www-authenticate": "Bearer"},
    ),
]


def test_fast_path_answers_as_the_framework_did(served) -> None:
    url, model = served
    cases = _cases(model)
    assert len(cases) == len(RECORDED)
    for (path, headers, body), (status, shown, extra) in zip(cases, RECORDED, strict=True):
        answer = _normalised(httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30))
        answer = json.loads(json.dumps(answer))  # tuples as the recorded JSON has them
        expected_headers = {k: extra.get(k) for k in answer["headers"]}
        assert answer == {"status": status, "body": shown, "headers": expected_headers}, (
            path,
            headers,
            body[:60],
        )


def test_fast_path_streams(served) -> None:
    url, model = served
    request = {"model": model, "messages": HELLO, "max_tokens": 8, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
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
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "fast path reply"


def test_a_chunked_body_over_the_limit_is_cut_on_the_fast_path(served) -> None:
    fast, _model = served

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


def test_fast_path_streams_messages(served) -> None:
    url, model = served
    request = {"model": model, "messages": HELLO, "max_tokens": 8, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", f"{url}/v1/messages", json=request, headers=headers, timeout=30
    ) as answer:
        assert answer.status_code == 200
        names = [line[7:] for line in answer.iter_lines() if line.startswith("event: ")]
    events = [n for n in names if n != "ping"]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events


def test_no_framework_route_for_a_generation_path(fleet, tmp_path: Path) -> None:
    """One way in: the FastAPI router has no route for the generation paths."""
    app = create_app(*_gateway(fleet, tmp_path))
    framework_paths = {getattr(route, "path", None) for route in app.routes}
    assert not framework_paths & {route.path for route in GENERATION_ROUTES}
    assert set(app.fast_routes) == {route.path for route in GENERATION_ROUTES}
    document = app.openapi()
    for route in GENERATION_ROUTES:
        assert "post" in document["paths"][route.path], route.path
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["required"] == ["model", "messages"]


def test_another_method_is_405_after_the_key_check(served) -> None:
    url, _model = served
    auth = {"authorization": f"Bearer {KEY}"}
    wrong = httpx.get(f"{url}/v1/chat/completions", headers=auth, timeout=30)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    keyless = httpx.get(f"{url}/v1/messages", timeout=30)  # the key is checked first
    assert keyless.status_code == 401 and keyless.json()["type"] == "error"


def test_a_root_path_is_served_by_the_fast_path(fleet, tmp_path: Path) -> None:
    """Behind a proxy that mounts the gateway under a prefix (``root_path``), the generation
    routes are the same endpoints (they used to fall back to the FastAPI routes)."""
    app = create_app(*_gateway(fleet, tmp_path))

    async def ask(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post("/api/v1/chat/completions", content=b"{x", headers=headers)

    keyless = asyncio.run(ask({}))
    assert keyless.status_code == 401  # keys are configured: the key check ran first
    assert keyless.headers["www-authenticate"] == "Bearer"
    bad = asyncio.run(ask({"x-api-key": KEY}))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
