"""Golden tests for the Responses API translation, checked by the official ``openai`` SDK."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from cortex.testing.golden import check_golden, golden_cases, load_case
from cortex.wire.errors import ApiError
from cortex.wire.responses import (
    ResponsesStreamTranslator,
    parse_responses_request,
    response_from_chat_completion,
)
from cortex.wire.sse import COMMENT_KEEPALIVE, SseDecoder

GOLDEN = Path(__file__).parent / "golden"
REQUESTS = golden_cases(GOLDEN / "responses_request")
RESPONSES = golden_cases(GOLDEN / "responses_response")
STREAMS = golden_cases(GOLDEN / "responses_stream")
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.mark.parametrize("path", REQUESTS, ids=[p.stem for p in REQUESTS])
def test_request_translation(path: Path) -> None:
    case = load_case(path)
    try:
        parsed = parse_responses_request(
            case["request"], hosted_tools=case.get("hosted_tools", "drop")
        )
        actual: dict[str, Any] = {
            "model": parsed.model,
            "stream": parsed.stream,
            "chat": parsed.chat,
            "echo": parsed.echo,
            "ignored_items": parsed.ignored_items,
        }
        if parsed.dropped_tools:
            actual["dropped_tools"] = parsed.dropped_tools
        if parsed.namespaced:
            actual["namespaced"] = parsed.namespaced
    except ApiError as error:
        assert error.status == 400
        actual = {"error": error.openai_body()}
    assert path.stem.startswith("error_") == ("error" in actual)
    check_golden(path, case, "expected", actual)


@pytest.mark.parametrize("path", RESPONSES, ids=[p.stem for p in RESPONSES])
def test_response_translation(path: Path) -> None:
    case = load_case(path)
    ChatCompletion.model_validate(case["completion"])
    request = parse_responses_request(case["request"])
    body = response_from_chat_completion(
        case["completion"], request, id="resp_golden", created_at=1700000000
    )
    parsed = Response.model_validate(body)  # the SDK's own model accepts it
    check_golden(path, case, "expected", body)
    check_golden(path, case, "expected_output_text", parsed.output_text)


def run_steps(case: dict[str, Any]) -> bytes:
    request = parse_responses_request({**case["request"], "stream": True})
    translator = ResponsesStreamTranslator(
        request, response_id_="resp_golden", created_at=1700000000
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
            frames += translator.fail(
                ApiError(e["status"], e["code"], e["message"], retry_after=e.get("retry_after"))
            )
    assert translator.finish() == [] and translator.feed({}) == []
    return b"".join(frames)


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_stream_events(path: Path) -> None:
    case = load_case(path)
    stream = run_steps(case)
    if any("ping" in step for step in case["steps"]):
        assert COMMENT_KEEPALIVE in stream
    events = [
        {"event": event, "data": json.loads(data)} for event, data in SseDecoder().feed(stream)
    ]
    for event in events:
        EVENT.validate_python(event["data"])  # every payload is a valid SDK event
        assert event["event"] == event["data"]["type"]
    assert [e["data"]["sequence_number"] for e in events] == list(range(len(events)))
    names = [e["event"] for e in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] in ("response.completed", "response.incomplete", "response.failed")
    check_golden(path, case, "expected_events", events)


def sdk_client(stream: bytes) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    return openai.OpenAI(
        api_key="k",
        base_url="http://cortex.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )


@pytest.mark.parametrize("path", STREAMS, ids=[p.stem for p in STREAMS])
def test_official_sdk_accumulates_the_stream(path: Path) -> None:
    case = load_case(path)
    client = sdk_client(run_steps(case))
    try:
        with client.responses.stream(model="qwen", input="hi") as stream:
            types = [event.type for event in stream]
            final = stream.get_final_response()
        outcome: dict[str, Any] = {
            "status": final.status,
            "output_text": final.output_text,
            "output": [item.model_dump(mode="json", exclude_none=True) for item in final.output],
            "usage": final.usage.model_dump(mode="json") if final.usage else None,
            "last_event": types[-1],
        }
    except (openai.APIError, RuntimeError) as exc:
        outcome = {"error": {"class": type(exc).__name__, "message": str(exc)}}
    check_golden(path, case, "expected_sdk", outcome)


@pytest.mark.parametrize("kind", [["message"], {"a": 1}, 7])
def test_an_input_item_type_that_is_not_a_string_is_a_400(kind: Any) -> None:
    """Found by the fuzz test: a list ``type`` reached a set lookup and raised TypeError (a
    500 on the gateway) instead of a typed 400."""
    with pytest.raises(ApiError) as info:
        parse_responses_request({"model": "m", "input": [{"type": kind, "content": "hi"}]})
    assert info.value.status == 400
    assert info.value.param == "input[0]"
