"""Golden corpus for the OpenAI-chunks -> Anthropic SSE translator, checked by the real SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from cortex.testing.golden import check_golden, golden_cases, load_case
from cortex.wire.anthropic import AnthropicStreamTranslator
from cortex.wire.errors import ApiError
from cortex.wire.sse import SseDecoder

FOLDER = Path(__file__).parent / "golden" / "anthropic_stream"
CASES = golden_cases(FOLDER)


def run_steps(case: dict[str, Any]) -> bytes:
    """Drive a translator through a case's steps; the bytes a client would receive."""
    translator = AnthropicStreamTranslator(
        case["model"], message_id="msg_golden", thinking=case["thinking"]
    )
    frames: list[bytes] = []
    for step in case["steps"]:
        if "chunk" in step:
            frames += translator.feed(step["chunk"])
        elif "start" in step:
            frames += translator.start()
        elif "ping" in step:
            frames += translator.ping()
        elif "done" in step or "eof" in step:
            frames += translator.finish()
        elif "error" in step:
            e = step["error"]
            error = ApiError(e["status"], e["code"], e["message"], retry_after=e.get("retry_after"))
            frames += translator.fail(error)
    assert translator.finish() == [], "a closed translator must stay silent"
    return b"".join(frames)


def decode(stream: bytes) -> list[dict[str, Any]]:
    events = list(SseDecoder().feed(stream))
    return [{"event": event, "data": json.loads(data)} for event, data in events]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_events_match_golden(path: Path) -> None:
    case = load_case(path)
    events = decode(run_steps(case))
    check_golden(path, case, "expected_events", events)
    # Invariants of Anthropic's event grammar, whatever the case.
    assert all(e["event"] == e["data"]["type"] for e in events)
    names = [e["event"] for e in events]
    if names[-1] != "error":
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [e["data"]["index"] for e in events if e["event"] == "content_block_start"]
    stops = [e["data"]["index"] for e in events if e["event"] == "content_block_stop"]
    assert starts == list(range(len(starts)))
    if names[-1] != "error":
        assert stops == starts


def sdk_client(stream: bytes) -> anthropic.Anthropic:
    """The official client, with a transport that answers with our bytes (no network)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    return anthropic.Anthropic(
        api_key="k",
        base_url="http://cortex.test",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_official_sdk_accumulates_the_stream(path: Path) -> None:
    case = load_case(path)
    client = sdk_client(run_steps(case))
    request = {
        "model": case["model"],
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    }
    try:
        with client.messages.stream(**request) as stream:
            message = stream.get_final_message()
        outcome: dict[str, Any] = {"message": message.model_dump(mode="json", exclude_none=True)}
    except anthropic.APIStatusError as exc:
        outcome = {"error": {"class": type(exc).__name__, "body": exc.body}}
    check_golden(path, case, "expected_sdk", outcome)


@pytest.mark.parametrize("name", ["text_only", "tool_call_after_text", "midstream_error"])
def test_async_sdk_reads_the_same_stream(name: str) -> None:
    """``AsyncAnthropic`` with ``messages.stream`` ends with the same message (or error)."""
    import asyncio

    path = FOLDER / f"{name}.json"
    case = load_case(path)
    stream_bytes = run_steps(case)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=stream_bytes
        )

    async def run() -> dict[str, Any]:
        client = anthropic.AsyncAnthropic(
            api_key="k",
            base_url="http://cortex.test",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
            max_retries=0,
        )
        try:
            async with client.messages.stream(
                model=case["model"], max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                message = await stream.get_final_message()
            return {"message": message.model_dump(mode="json", exclude_none=True)}
        except anthropic.APIStatusError as exc:
            return {"error": {"class": type(exc).__name__, "body": exc.body}}

    assert asyncio.run(run()) == case["expected_sdk"]
