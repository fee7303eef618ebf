"""Arbitrary input never escapes as anything but a typed ApiError (no tracebacks, no 500s)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.wire.anthropic import (
    AnthropicStreamTranslator,
    message_from_chat_completion,
    parse_count_tokens_request,
    parse_messages_request,
)
from cortex.wire.errors import ApiError
from cortex.wire.responses import (
    ResponsesStreamTranslator,
    parse_responses_request,
    response_from_chat_completion,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 3) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
KEYS = [
    "type",
    "role",
    "content",
    "text",
    "id",
    "name",
    "input",
    "tool_use_id",
    "is_error",
    "call_id",
    "arguments",
    "output",
    "parameters",
    "input_schema",
    "description",
]
block = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        | st.sampled_from(
            [
                "text",
                "tool_use",
                "tool_result",
                "user",
                "assistant",
                "system",
                "message",
                "function_call",
                "function_call_output",
                "function",
                "input_text",
                "output_text",
                "developer",
            ]
        )
        for key in KEYS
    },
)
content = st.text(max_size=5) | st.lists(block, max_size=3) | json_values
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values,
        "content": content,
    },
    optional={"type": st.sampled_from(["message", "function_call"])},
)
anthropic_body = st.fixed_dictionaries(
    {"model": st.text(max_size=3) | json_values, "messages": st.lists(message | block, max_size=4)},
    optional={
        "max_tokens": st.integers(-1, 5) | json_values,
        "system": content,
        "tools": st.lists(block, max_size=2) | json_values,
        "tool_choice": block | json_values,
        "temperature": json_values,
        "top_k": json_values,
        "stop_sequences": json_values,
        "stream": json_values,
        "thinking": block | json_values,
        "metadata": json_values,
    },
)
responses_body = st.fixed_dictionaries(
    {
        "model": st.text(max_size=3) | json_values,
        "input": st.text(max_size=3) | st.lists(message | block, max_size=4) | json_values,
    },
    optional={
        "instructions": json_values,
        "tools": st.lists(block, max_size=2) | json_values,
        "tool_choice": block | json_values,
        "max_output_tokens": json_values,
        "store": json_values,
        "text": json_values,
        "stream": json_values,
        "parallel_tool_calls": json_values,
    },
)


def only_api_errors(parse: Any, body: Any) -> None:
    try:
        parse(body)
    except ApiError as error:
        assert error.status == 400


@settings(max_examples=100, deadline=None)
@given(anthropic_body)
def test_messages_requests(body: dict[str, Any]) -> None:
    only_api_errors(parse_messages_request, body)
    only_api_errors(parse_count_tokens_request, body)


@settings(max_examples=100, deadline=None)
@given(responses_body)
def test_responses_requests(body: dict[str, Any]) -> None:
    only_api_errors(parse_responses_request, body)


chunk = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "content": json_values,
                            "reasoning_content": json_values,
                            "tool_calls": st.lists(block | json_values, max_size=2) | json_values,
                        },
                    )
                    | json_values,
                    "message": json_values,
                    "finish_reason": st.sampled_from(["stop", "length", "tool_calls"])
                    | json_values,
                    "stop_sequence": json_values,
                },
            )
            | json_values,
            max_size=2,
        )
        | json_values,
        "usage": json_values,
        "error": json_values,
        "id": json_values,
    },
)


@settings(max_examples=100, deadline=None)
@given(st.lists(chunk, max_size=5))
def test_stream_translators_survive_any_chunks(chunks: list[dict[str, Any]]) -> None:
    request = parse_responses_request({"model": "m", "input": "x"})
    for translator in (
        AnthropicStreamTranslator("m", thinking=True),
        ResponsesStreamTranslator(request),
    ):
        for c in chunks:
            translator.feed(c)
        translator.ping()
        translator.finish()
    for c in chunks:
        message_from_chat_completion(c, "m")
        response_from_chat_completion(c, request)
