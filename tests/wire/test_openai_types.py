"""The OpenAI builders produce what the official SDK's models accept."""

from __future__ import annotations

import json

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cortex.wire.openai_types import (
    assistant_message,
    chat_chunk,
    chat_completion,
    completion_id,
    message_text,
    tool_call_arguments_as_objects,
    usage_chunk,
)
from cortex.wire.toolcalls import parse_output


def test_text_completion_parses_with_the_sdk() -> None:
    body = chat_completion(
        id=completion_id(),
        model="huggingface:org/m",
        message=assistant_message("hi", reasoning_content="think"),
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        stop_sequence="###",
    )
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "hi"
    assert parsed.usage is not None and parsed.usage.total_tokens == 4
    assert body["choices"][0]["stop_sequence"] == "###"
    assert body["choices"][0]["message"]["reasoning_content"] == "think"
    assert body["id"].startswith("chatcmpl-")


def test_tool_call_completion_parses_with_the_sdk() -> None:
    parsed_output = parse_output('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    calls = [call.openai() for call in parsed_output.tool_calls]
    body = chat_completion(
        id="chatcmpl-1",
        model="m",
        message=assistant_message(parsed_output.content, tool_calls=calls),
        finish_reason="tool_calls",
        prompt_tokens=3,
        completion_tokens=9,
    )
    message = ChatCompletion.model_validate(body).choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "f"
    assert json.loads(message.tool_calls[0].function.arguments) == {"a": 1}


def test_chunks_parse_with_the_sdk() -> None:
    chunks = [
        chat_chunk(id="c", model="m", delta={"role": "assistant", "content": ""}),
        chat_chunk(id="c", model="m", delta={"content": "hi"}),
        chat_chunk(
            id="c",
            model="m",
            delta={
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ]
            },
        ),
        chat_chunk(id="c", model="m", delta={}, finish_reason="tool_calls"),
        usage_chunk(id="c", model="m", prompt_tokens=2, completion_tokens=3),
    ]
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]
    assert parsed[1].choices[0].delta.content == "hi"
    assert parsed[3].choices[0].finish_reason == "tool_calls"
    assert parsed[4].choices == [] and parsed[4].usage is not None
    assert parsed[4].usage.completion_tokens == 3
    assert "stop_sequence" not in chunks[1]["choices"][0]
    assert chunks[3]["choices"][0]["stop_sequence"] is None


def test_empty_content_without_tool_calls_stays_a_string() -> None:
    assert assistant_message("")["content"] == ""
    assert assistant_message("", tool_calls=[{"id": "x"}])["content"] is None


def test_tool_call_arguments_as_objects_for_templates() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "2", "type": "function", "function": {"name": "g", "arguments": "oops"}},
                {"id": "3", "type": "function", "function": {"name": "h", "arguments": ""}},
            ],
        },
    ]
    rendered = tool_call_arguments_as_objects(messages)
    calls = rendered[1]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{"a": 1}, "oops", {}]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # not mutated


def test_message_text() -> None:
    assert message_text(None) == ""
    assert message_text("a") == "a"
    assert (
        message_text(
            [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
        )
        == "ab"
    )
