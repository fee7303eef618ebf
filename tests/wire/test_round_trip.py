"""A tool round trip through every pure piece: model text -> parser -> OpenAI shapes ->
Anthropic / Responses -> the SDKs' own types -> the next request."""

from __future__ import annotations

import json

from anthropic.types import Message
from openai.types.responses import Response

from cortex.wire.anthropic import message_from_chat_completion, parse_messages_request
from cortex.wire.openai_types import (
    assistant_message,
    chat_completion,
    tool_call_arguments_as_objects,
)
from cortex.wire.responses import parse_responses_request, response_from_chat_completion
from cortex.wire.toolcalls import parse_output

MODEL_TEXT = (
    "<think>The user wants weather.</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


def neuron_answer(text: str, tools: bool) -> dict:
    """What a neuron returns for generated ``text`` (the same helpers it uses)."""
    parsed = parse_output(text, tools=tools)
    calls = [call.openai() for call in parsed.tool_calls]
    return chat_completion(
        id="chatcmpl-rt",
        model="huggingface:org/m",
        message=assistant_message(
            parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls
        ),
        finish_reason=parsed.finish_reason_override or "stop",
        prompt_tokens=30,
        completion_tokens=20,
    )


def test_anthropic_tool_round_trip() -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    first = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 64,
            "tools": tools,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
        }
    )
    assert first.chat["tools"][0]["function"]["name"] == "get_weather"
    message = Message.model_validate(
        message_from_chat_completion(neuron_answer(MODEL_TEXT, tools=True), "m")
    )
    assert message.stop_reason == "tool_use"
    (tool_use,) = message.content
    assert tool_use.type == "tool_use" and tool_use.input == {"city": "Paris"}

    second = parse_messages_request(
        {
            "model": "m",
            "max_tokens": 64,
            "tools": tools,
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [tool_use.model_dump(exclude_none=True)]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": tool_use.id, "content": "18C"}
                    ],
                },
            ],
        }
    )
    history = second.chat["messages"]
    assert history[1]["tool_calls"][0]["id"] == tool_use.id
    assert history[2] == {"role": "tool", "tool_call_id": tool_use.id, "content": "18C"}
    rendered = tool_call_arguments_as_objects(history)
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}

    final = Message.model_validate(
        message_from_chat_completion(neuron_answer("It is 18C in Paris.", tools=True), "m")
    )
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text" and final.content[0].text == "It is 18C in Paris."


def test_responses_function_call_round_trip() -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    request = parse_responses_request({"model": "m", "input": "Weather in Paris?", "tools": tools})
    response = Response.model_validate(
        response_from_chat_completion(neuron_answer(MODEL_TEXT, tools=True), request)
    )
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "function_call"]
    call = response.output[1]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}

    follow_up = parse_responses_request(
        {
            "model": "m",
            "tools": tools,
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": call.call_id, "output": "18C"},
            ],
        }
    )
    history = follow_up.chat["messages"]
    assert history[1]["tool_calls"][0]["id"] == call.call_id
    assert history[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "18C"}
