"""Golden tests for the non-streaming Anthropic <-> OpenAI translation, and the error mapping."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx2 as httpx
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion

from cortex.testing.golden import check_golden, golden_cases, load_case
from cortex.wire.anthropic import (
    count_tokens_response,
    message_from_chat_completion,
    parse_count_tokens_request,
    parse_messages_request,
    tool_input,
)
from cortex.wire.errors import ApiError, model_not_found, service_unavailable

GOLDEN = Path(__file__).parent / "golden"
REQUESTS = golden_cases(GOLDEN / "anthropic_request")
RESPONSES = golden_cases(GOLDEN / "anthropic_response")


@pytest.mark.parametrize("path", REQUESTS, ids=[p.stem for p in REQUESTS])
def test_request_translation(path: Path) -> None:
    case = load_case(path)
    try:
        parsed = parse_messages_request(
            case["request"], hosted_tools=case.get("hosted_tools", "drop")
        )
        actual = {
            "model": parsed.model,
            "stream": parsed.stream,
            "thinking": parsed.thinking,
            "chat": parsed.chat,
        }
        if parsed.dropped_tools:
            actual["dropped_tools"] = parsed.dropped_tools
    except ApiError as error:
        assert error.status == 400
        actual = {"error": {"param": error.param, **error.anthropic_body()}}
    assert path.stem.startswith("error_") == ("error" in actual)
    check_golden(path, case, "expected", actual)


@pytest.mark.parametrize("path", RESPONSES, ids=[p.stem for p in RESPONSES])
def test_response_translation(path: Path) -> None:
    case = load_case(path)
    ChatCompletion.model_validate(case["completion"])  # the input is a real OpenAI shape
    message = message_from_chat_completion(
        case["completion"], case["model"], thinking=case["thinking"]
    )
    Message.model_validate(message)  # the official SDK's model accepts the output
    check_golden(path, case, "expected", message)


def test_requests_built_by_the_sdk_are_accepted() -> None:
    """What ``anthropic`` itself serialises for a tool round trip parses without error."""
    body = {
        "model": "m",
        "max_tokens": 10,
        "system": [{"type": "text", "text": "s"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sun"}],
            },
        ],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}],
    }
    chat = parse_messages_request(body).chat
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]


@pytest.mark.parametrize(
    ("error", "anthropic_type", "sdk_error"),
    [
        (
            ApiError(400, "invalid_request", "bad"),
            "invalid_request_error",
            anthropic.BadRequestError,
        ),
        (model_not_found("x"), "not_found_error", anthropic.NotFoundError),
        (service_unavailable("busy"), "overloaded_error", anthropic.InternalServerError),
        (ApiError(429, "rate_limited", "slow down"), "rate_limit_error", anthropic.RateLimitError),
        (ApiError(500, "internal_error", "oops"), "api_error", anthropic.InternalServerError),
        (ApiError(502, "upstream_error", "node"), "api_error", anthropic.InternalServerError),
        (
            ApiError(401, "unauthorized", "key"),
            "authentication_error",
            anthropic.AuthenticationError,
        ),
    ],
)
def test_error_envelope_reaches_the_sdk(
    error: ApiError, anthropic_type: str, sdk_error: type[anthropic.APIStatusError]
) -> None:
    """The Anthropic envelope, as the official client sees it (status, class, type, message)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(error.status, json=error.anthropic_body(), headers=error.headers())

    client = anthropic.Anthropic(
        api_key="k",
        base_url="http://cortex.test",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    with pytest.raises(sdk_error) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == error.status
    assert caught.value.body == {
        "type": "error",
        "error": {"type": anthropic_type, "message": error.message},
    }


def test_retryable_errors_keep_retry_after() -> None:
    error = ApiError.from_openai_body(
        503, {"error": {"message": "loading", "code": "model_loading"}}, retry_after=7
    )
    assert error.anthropic_type == "overloaded_error"
    assert error.headers() == {"Retry-After": "7", "x-should-retry": "true"}


def test_tool_input_never_loses_arguments() -> None:
    assert tool_input('{"a": 1}') == {"a": 1}
    assert tool_input("") == {}
    assert tool_input("[1]") == {"_raw_arguments": "[1]"}
    assert tool_input("oops") == {"_raw_arguments": "oops"}


def test_count_tokens_request_builds_the_tokenize_body() -> None:
    body = {
        "model": "m",
        "system": "s",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}],
    }
    parsed = parse_count_tokens_request(body)
    assert parsed.tokenize == {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
        ],
    }
    assert count_tokens_response({"model": "m", "count": 12, "context_length": 256}) == {
        "input_tokens": 12
    }
    anthropic.types.MessageTokensCount.model_validate(count_tokens_response({"count": 3}))


def test_count_tokens_request_is_validated() -> None:
    with pytest.raises(ApiError) as caught:
        parse_count_tokens_request({"model": "m", "messages": []})
    assert caught.value.status == 400 and caught.value.param == "messages"
