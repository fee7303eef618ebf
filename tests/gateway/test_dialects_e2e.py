"""Anthropic Messages and OpenAI Responses through the gateway, with the official SDKs."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from cortex.config import ModelProfile


@pytest.fixture
def gw(fleet):
    fleet.publish_echo("dia/echo", reply="The answer is 42.", memory_mb=10)
    fleet.publish_echo(
        "dia/tools",
        reply="It is sunny in Paris.",
        memory_mb=10,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    return fleet.gateway(
        models=[
            ModelProfile(id="dia/echo", memory_mb=10),
            ModelProfile(id="dia/tools", memory_mb=10),
        ],
        aliases={"claude-echo": "dia/echo"},
    )


def claude(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)


def test_anthropic_messages_whole_and_streamed(gw) -> None:
    message = claude(gw).messages.create(
        model="claude-echo",
        max_tokens=64,
        system="be exact",
        messages=[{"role": "user", "content": "what is it?"}],
    )
    assert message.model == "claude-echo"
    assert message.content[0].type == "text"
    assert message.content[0].text == "The answer is 42."
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    with claude(gw).messages.stream(
        model="claude-echo", max_tokens=64, messages=[{"role": "user", "content": "again"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "The answer is 42."
    assert final.stop_reason == "end_turn"


def test_anthropic_tool_use_round_trip(gw) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    first = claude(gw).messages.create(
        model="dia/tools",
        max_tokens=128,
        tools=tools,
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    second = claude(gw).messages.create(
        model="dia/tools",
        max_tokens=128,
        tools=tools,
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content[-1].text == "It is sunny in Paris."


def test_anthropic_errors_use_the_anthropic_envelope(gw) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude(gw).messages.create(
            model="nobody/knows", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    answer = httpx.post(
        f"{gw.url}/v1/messages",
        json={"model": "claude-echo", "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in answer.json()["error"]["message"]


def test_anthropic_count_tokens_is_the_rendered_prompt(gw) -> None:
    counted = claude(gw).messages.count_tokens(
        model="claude-echo", messages=[{"role": "user", "content": "one two three"}]
    )
    assert counted.input_tokens >= 3


def test_openai_responses_whole_and_streamed(gw) -> None:
    client = gw.client()
    response = client.responses.create(model="claude-echo", input="what is it?")
    assert response.output_text == "The answer is 42."
    assert response.model == "claude-echo"
    events = list(client.responses.create(model="dia/echo", input="again", stream=True))
    assert events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "The answer is 42."
