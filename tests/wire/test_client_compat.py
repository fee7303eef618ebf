"""Regression tests for what real coding agents tripped over (issue 19), at the wire level:
retry headers, structured output, hosted tools and namespaces, stream endings, spec shapes.
The same behaviours are exercised end to end by tests/clients (the real agents)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response

from cortex.neuron.requests import check_content_parts, parse_chat_request
from cortex.wire.anthropic import (
    AnthropicStreamTranslator,
    message_from_chat_completion,
    parse_messages_request,
)
from cortex.wire.errors import ApiError
from cortex.wire.openai_types import assistant_message, chat_chunk, usage_chunk
from cortex.wire.responses import (
    ResponsesStreamTranslator,
    parse_responses_request,
    response_from_chat_completion,
)
from cortex.wire.sse import SseDecoder

ASK = [{"role": "user", "content": "x"}]


def events(frames: list[bytes]) -> list[tuple[str | None, dict[str, Any]]]:
    decoder = SseDecoder()
    return [(event, json.loads(data)) for event, data in decoder.feed(b"".join(frames))]


# ---- retry headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (400, None, {"x-should-retry": "false"}),
        (401, None, {"x-should-retry": "false"}),  # a wrong key: Claude Code stops at once
        (404, None, {"x-should-retry": "false"}),
        (413, None, {"x-should-retry": "false"}),
        (422, 5, {"Retry-After": "5", "x-should-retry": "true"}),
        (429, 2, {"Retry-After": "2", "x-should-retry": "true"}),
        (503, 5, {"Retry-After": "5", "x-should-retry": "true"}),
        (429, None, {}),  # no advice: the client's own policy (it retries 429)
        (500, None, {}),
    ],
)
def test_every_error_says_whether_to_retry(
    status: int, retry_after: float | None, expected: dict[str, str]
) -> None:
    assert ApiError(status, "x", "m", retry_after=retry_after).headers() == expected


def test_method_not_allowed_is_a_client_error() -> None:
    error = ApiError(405, "method_not_allowed", "no")
    assert error.openai_type == "invalid_request_error"
    assert error.anthropic_type == "invalid_request_error"


# ---- Anthropic -------------------------------------------------------------------------------


def test_structured_output_becomes_the_chat_response_format() -> None:
    """Anthropic structured output (issue 19: it was ignored, then refused) is enforced now:
    it travels as the chat request's response_format, which the harness decodes under."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    expected = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    for body in (
        {"output_config": {"format": {"type": "json_schema", "schema": schema}}},
        {"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}},
        {"output_format": {"type": "json_schema", "schema": schema}},  # the older beta field
    ):
        parsed = parse_messages_request({"model": "m", "max_tokens": 5, "messages": ASK, **body})
        assert parsed.chat["response_format"] == expected
    for body, param in (
        ({"output_config": {"format": {"type": "regex"}}}, "output_config.format"),
        ({"output_format": {"type": "json_schema"}}, "output_format.schema"),
    ):
        with pytest.raises(ApiError) as caught:
            parse_messages_request({"model": "m", "max_tokens": 5, "messages": ASK, **body})
        assert (caught.value.status, caught.value.param) == (400, param)
    # effort alone (Claude Code sends it on every request) is accepted
    plain = parse_messages_request(
        {"model": "m", "max_tokens": 5, "messages": ASK, "output_config": {"effort": "high"}}
    )
    assert "response_format" not in plain.chat


def test_server_tools_follow_the_hosted_tools_policy() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": ASK,
        "tools": [
            {"type": "web_search_20250305", "name": "web_search"},
            {"name": "f", "input_schema": {"type": "object"}},
        ],
    }
    parsed = parse_messages_request(body)
    assert parsed.dropped_tools == ("web_search_20250305",)
    assert [t["function"]["name"] for t in parsed.chat["tools"]] == ["f"]
    with pytest.raises(ApiError) as caught:
        parse_messages_request(body, hosted_tools="refuse")
    assert caught.value.code == "unsupported_tool"


def test_thinking_blocks_carry_a_signature() -> None:
    completion = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "message": {"role": "assistant", "content": "a", "reasoning_content": "hmm"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    whole = message_from_chat_completion(completion, "m", thinking=True)
    assert whole["content"][0]["type"] == "thinking"
    signature = whole["content"][0]["signature"]
    assert signature

    translator = AnthropicStreamTranslator("m", thinking=True)
    frames = translator.feed(chat_chunk(id="c", model="m", delta={"reasoning_content": "hmm"}))
    frames += translator.feed(chat_chunk(id="c", model="m", delta={"content": "a"}))
    frames += translator.feed(chat_chunk(id="c", model="m", delta={}, finish_reason="stop"))
    frames += translator.finish()
    signatures = [
        data["delta"]["signature"]
        for _event, data in events(frames)
        if data.get("delta", {}).get("type") == "signature_delta"
    ]
    assert signatures == [signature]  # the same text signs the same in both shapes


def test_message_start_carries_the_prompt_length() -> None:
    """The neuron's first chunk reports the prompt (report_prompt_tokens): message_start says
    it, as Anthropic's does (Claude Code shows context use from it)."""
    translator = AnthropicStreamTranslator("m")
    first = chat_chunk(id="c", model="m", delta={"role": "assistant"})
    first["usage"] = {"prompt_tokens": 1234, "completion_tokens": 0, "total_tokens": 1234}
    frames = translator.feed(first)
    frames += translator.feed(chat_chunk(id="c", model="m", delta={"content": "hi"}))
    frames += translator.feed(chat_chunk(id="c", model="m", delta={}, finish_reason="stop"))
    frames += translator.feed(
        usage_chunk(id="c", model="m", prompt_tokens=1234, completion_tokens=2)
    )
    frames += translator.finish()
    decoded = events(frames)
    assert decoded[0][1]["message"]["usage"]["input_tokens"] == 1234
    delta = next(data for event, data in decoded if event == "message_delta")
    assert delta["usage"] == {"input_tokens": 1234, "output_tokens": 2}


# ---- Responses -------------------------------------------------------------------------------

NAMESPACED = {
    "model": "m",
    "input": "x",
    "tools": [
        {
            "type": "namespace",
            "name": "agents",
            "description": "sub-agents",
            "tools": [{"type": "function", "name": "spawn", "parameters": {"type": "object"}}],
        },
        {"type": "web_search", "external_web_access": False},
    ],
}


def test_a_call_to_a_namespaced_tool_names_its_namespace() -> None:
    request = parse_responses_request(NAMESPACED)
    assert request.dropped_tools == ("web_search",)
    assert [t["function"]["name"] for t in request.chat["tools"]] == ["spawn"]
    call = {"id": "call_1", "type": "function", "function": {"name": "spawn", "arguments": "{}"}}
    completion = {
        "id": "chatcmpl-1",
        "choices": [
            {"message": assistant_message(None, tool_calls=[call]), "finish_reason": "tool_calls"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    body = response_from_chat_completion(completion, request)
    Response.model_validate(body)
    item = body["output"][0]
    assert (item["type"], item["namespace"], item["name"]) == ("function_call", "agents", "spawn")

    translator = ResponsesStreamTranslator(request)
    frames = translator.feed(
        chat_chunk(id="c", model="m", delta={"tool_calls": [{"index": 0, **call}]})
    )
    frames += translator.feed(chat_chunk(id="c", model="m", delta={}, finish_reason="tool_calls"))
    frames += translator.finish()
    done = [
        data["item"] for _e, data in events(frames) if data["type"] == "response.output_item.done"
    ]
    assert done[0]["namespace"] == "agents" and done[0]["name"] == "spawn"


def test_hosted_tools_are_refused_in_strict_mode() -> None:
    with pytest.raises(ApiError) as caught:
        parse_responses_request(NAMESPACED, hosted_tools="refuse")
    assert (caught.value.code, caught.value.param) == ("unsupported_tool", "tools[1].type")


def test_responses_logprobs_ask_the_chat_request_and_come_back_in_the_output_text() -> None:
    request = parse_responses_request(
        {"model": "m", "input": "x", "include": ["message.output_text.logprobs"]}
    )
    assert (request.chat["logprobs"], request.chat["top_logprobs"]) == (True, 0)
    asked = parse_responses_request({"model": "m", "input": "x", "top_logprobs": 2})
    assert (asked.chat["logprobs"], asked.chat["top_logprobs"]) == (True, 2)
    plain = parse_responses_request({"model": "m", "input": "x"})
    assert "logprobs" not in plain.chat
    entry = {"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}
    completion = {
        "choices": [
            {
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
                "logprobs": {"content": [entry], "refusal": None},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    whole = response_from_chat_completion(completion, request)
    assert whole["output"][0]["content"][0]["logprobs"] == [entry]
    translator = ResponsesStreamTranslator(request, created_at=1700000000)
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {"content": "hi"},
                "logprobs": {"content": [entry], "refusal": None},
                "finish_reason": "stop",
            }
        ]
    }
    kinds = events([*translator.start(), *translator.feed(chunk), *translator.finish()])
    delta = next(e for name, e in kinds if name == "response.output_text.delta")
    done = next(e for name, e in kinds if name == "response.output_text.done")
    assert delta["logprobs"] == [entry] and done["logprobs"] == [entry]


def test_response_objects_match_the_schema_types() -> None:
    request = parse_responses_request({"model": "m", "input": "x"})
    translator = ResponsesStreamTranslator(request, created_at=1700000000.75)
    created = events(translator.start())[0][1]["response"]
    assert created["created_at"] == 1700000000 and isinstance(created["created_at"], int)
    assert "usage" not in created and "user" not in created  # absent, never null
    with_user = parse_responses_request({"model": "m", "input": "x", "user": "u1"})
    assert with_user.echo["user"] == "u1"


def test_a_stream_that_fails_mid_answer_closes_its_open_item() -> None:
    translator = ResponsesStreamTranslator(parse_responses_request({"model": "m", "input": "x"}))
    frames = translator.feed(chat_chunk(id="c", model="m", delta={"content": "half an"}))
    frames += translator.fail(ApiError(502, "upstream_error", "the neuron went away"))
    decoded = [data for _e, data in events(frames)]
    kinds = [data["type"] for data in decoded]
    assert kinds[-5:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    assert decoded[-3]["item"]["status"] == "incomplete"
    failed = decoded[-1]["response"]
    assert failed["output"][0]["content"][0]["text"] == "half an"
    Response.model_validate(failed)
    assert [d["sequence_number"] for d in decoded] == list(range(len(decoded)))


# ---- chat (the neuron's parsing) -------------------------------------------------------------


def chat(**body: Any) -> Any:
    return parse_chat_request({"model": "m", "messages": ASK, **body})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_chat_fields_cortex_cannot_honour_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat(**body)
    assert (caught.value.status, caught.value.param) == (400, param)


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
def test_a_message_without_content_is_a_400(role: str) -> None:
    """As OpenAI answers (issue 22, item 7): not accepted as empty."""
    message: dict[str, Any] = {"role": role}
    if role == "tool":
        message["tool_call_id"] = "c1"
    with pytest.raises(ApiError) as caught:
        parse_chat_request({"model": "m", "messages": [message]})
    assert caught.value.param == "messages[0].content"
    # an assistant turn with tool calls may leave it out
    parse_chat_request(
        {
            "model": "m",
            "messages": [
                *ASK,
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]},
            ],
        }
    )


def test_image_parts_are_refused_unless_the_model_takes_them() -> None:
    parsed = chat(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ]
    )
    with pytest.raises(ApiError) as caught:
        check_content_parts(parsed.messages, frozenset())
    assert (caught.value.code, caught.value.param) == (
        "unsupported_content",
        "messages[0].content[1]",
    )
    check_content_parts(parsed.messages, frozenset({"image_url"}))  # a vision model


@pytest.mark.parametrize("role", ["user", "system", "developer"])
@pytest.mark.parametrize("content", ["left out", None])
def test_a_responses_message_without_content_is_a_400(role: str, content: object) -> None:
    """The Responses API refuses it as chat does (it was accepted as an empty turn: a 200 with
    an empty output); an assistant item may leave it out."""
    item: dict[str, Any] = {"type": "message", "role": role}
    if content is None:
        item["content"] = None
    with pytest.raises(ApiError) as caught:
        parse_responses_request({"model": "m", "input": [item]})
    assert (caught.value.status, caught.value.param) == (400, "input[0].content")
    parse_responses_request(
        {"model": "m", "input": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    )
