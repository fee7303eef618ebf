"""The SSE translation loop: frame splitting, [DONE]/EOF, pings while quiet, upstream failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from cortex.wire.anthropic import AnthropicStreamTranslator
from cortex.wire.errors import ApiError
from cortex.wire.openai_types import chat_chunk, usage_chunk
from cortex.wire.responses import ResponsesStreamTranslator, parse_responses_request
from cortex.wire.sse import DONE, SseDecoder, encode_data
from cortex.wire.streaming import translate_sse


def upstream_bytes(*texts: str, finish: str = "stop") -> bytes:
    frames = [encode_data(chat_chunk(id="c", model="m", delta={"role": "assistant"}))]
    frames += [encode_data(chat_chunk(id="c", model="m", delta={"content": t})) for t in texts]
    frames.append(encode_data(chat_chunk(id="c", model="m", delta={}, finish_reason=finish)))
    frames.append(encode_data(usage_chunk(id="c", model="m", prompt_tokens=4, completion_tokens=2)))
    return b"".join(frames) + DONE


async def pieces(data: bytes, size: int, delay: float = 0.0) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if delay:
            await asyncio.sleep(delay)
        yield data[start : start + size]


def collect(stream: AsyncIterator[bytes]) -> list[tuple[str | None, Any]]:
    async def run() -> bytes:
        return b"".join([frame async for frame in stream])

    raw = asyncio.run(run())
    events = [(event, json.loads(data)) for event, data in SseDecoder().feed(raw)]
    return events + ([("comment", raw.count(b": keep-alive"))] if b": keep-alive" in raw else [])


def test_frames_split_anywhere_translate_the_same() -> None:
    data = upstream_bytes("Hel", "lo")
    expected = collect(translate_sse(pieces(data, len(data)), AnthropicStreamTranslator("m")))
    for size in (1, 3, 7, 50):
        translator = AnthropicStreamTranslator("m", message_id=expected[0][1]["message"]["id"])
        assert collect(translate_sse(pieces(data, size), translator)) == expected
    text = "".join(e[1]["delta"]["text"] for e in expected if e[0] == "content_block_delta")
    assert text == "Hello"
    assert expected[-2][1]["usage"] == {"input_tokens": 4, "output_tokens": 2}


def test_pings_while_the_upstream_is_quiet() -> None:
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.2)  # a cold load
        yield upstream_bytes("late")

    events = collect(translate_sse(slow(), AnthropicStreamTranslator("m"), ping_interval=0.03))
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names.count("ping") >= 2
    assert names[-1] == "message_stop"
    assert names.index("ping") < names.index("content_block_start")


def test_responses_keepalives_are_comments() -> None:
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.1)
        yield upstream_bytes("x")

    request = parse_responses_request({"model": "m", "input": "x", "stream": True})
    events = collect(translate_sse(slow(), ResponsesStreamTranslator(request), ping_interval=0.02))
    assert events[-1][0] == "comment" and events[-1][1] >= 2
    assert events[-2][0] == "response.completed"


def test_upstream_exception_becomes_an_error_event() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield encode_data(chat_chunk(id="c", model="m", delta={"content": "par"}))
        raise ConnectionResetError("node went away")

    events = collect(translate_sse(broken(), AnthropicStreamTranslator("m")))
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {
                "type": "api_error",
                "message": "the upstream stream failed (ConnectionResetError)",
            },
        },
    )


def test_upstream_api_error_keeps_its_type() -> None:
    async def overloaded() -> AsyncIterator[bytes]:
        raise ApiError(503, "no_room", "no node has room", retry_after=5)
        yield b""  # pragma: no cover

    events = collect(translate_sse(overloaded(), AnthropicStreamTranslator("m")))
    # message_start waits for the first chunk (it carries the prompt's length): none came
    assert [name for name, _ in events] == ["error"]
    assert events[-1][1]["error"]["type"] == "overloaded_error"


def test_eof_without_done_after_finish_is_complete() -> None:
    data = upstream_bytes("ok").removesuffix(DONE)
    events = collect(translate_sse(pieces(data, 10), AnthropicStreamTranslator("m")))
    assert events[-1][0] == "message_stop"


def test_eof_before_finish_is_an_error() -> None:
    data = encode_data(chat_chunk(id="c", model="m", delta={"content": "cut"}))
    events = collect(translate_sse(pieces(data, 10), AnthropicStreamTranslator("m")))
    assert events[-1][0] == "error"


def test_on_chunk_sees_every_chunk_and_garbage_is_skipped() -> None:
    seen: list[dict[str, Any]] = []
    data = b"data: not json\n\n" + upstream_bytes("a", "b")
    events = collect(
        translate_sse(pieces(data, 9), AnthropicStreamTranslator("m"), on_chunk=seen.append)
    )
    assert len(seen) == 5 and seen[-1]["usage"]["completion_tokens"] == 2
    assert events[-1][0] == "message_stop"


def test_closing_the_client_side_cancels_the_pending_read() -> None:
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield encode_data(chat_chunk(id="c", model="m", delta={"content": "a"}))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield b""  # pragma: no cover

    async def run() -> None:
        stream = translate_sse(endless(), AnthropicStreamTranslator("m"), ping_interval=0.01)
        received = 0
        async for _frame in stream:
            received += 1
            if received == 5:
                break
        await stream.aclose()
        await asyncio.sleep(0)
        assert cancelled.is_set()

    asyncio.run(run())
