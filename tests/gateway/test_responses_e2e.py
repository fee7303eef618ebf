"""OpenAI Responses (``client.responses.create``) and chat tool calls through a real gateway and
real neurons, with the official ``openai`` SDK."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from cortex.config import Duration, ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest

REPLY = "The answer is 42."
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
QUESTION = "weather in Paris?"


@pytest.fixture
def gw(fleet: Fleet) -> GatewayUnderTest:
    fleet.publish_echo("rsp/echo", reply=REPLY, memory_mb=10)
    fleet.publish_echo(
        "rsp/tools",
        reply="It is sunny in Paris.",
        memory_mb=10,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    fleet.publish_echo("rsp/think", reply="Done.", reasoning="Let me think.", memory_mb=10)
    fleet.publish_echo("rsp/cold", reply=REPLY, load_seconds=1.0, memory_mb=10)
    fleet.publish_echo("rsp/midfail", reply=REPLY, fail_after=2, memory_mb=10)
    names = ("echo", "tools", "think", "cold", "midfail")
    return fleet.gateway(
        models=[ModelProfile(id=f"rsp/{name}", memory_mb=10) for name in names],
        aliases={"gpt-echo": "rsp/echo"},
        stream_keepalive=Duration(0.2),
    )


def sequence_ok(events: list[Any]) -> None:
    """Every event carries its type and a 0-based, gap-free sequence_number."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert all(e.type for e in events)


# ---- Responses: text ---------------------------------------------------------------------


def test_responses_whole(gw: GatewayUnderTest) -> None:
    raw = gw.client().responses.with_raw_response.create(
        model="gpt-echo", instructions="be exact", input="what is it?"
    )
    response = raw.parse()
    assert response.output_text == REPLY
    assert response.model == "gpt-echo"
    assert response.status == "completed"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 5
    assert raw.headers["x-cortex-model"] == "huggingface:rsp/echo"
    assert raw.headers["x-cortex-node"] in ("n1", "n2", "n3")
    # message items with and without "type", system and developer turns
    again = gw.client().responses.create(
        model="gpt-echo",
        input=[
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what is it?"},
            {"type": "item_reference", "id": "msg_unknown"},  # tolerated, logged
        ],
    )
    assert again.output_text == REPLY


def test_responses_streamed(gw: GatewayUnderTest) -> None:
    events = list(gw.client().responses.create(model="gpt-echo", input="again", stream=True))
    sequence_ok(events)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    final = events[-1].response
    assert final.output_text == REPLY and final.model == "gpt-echo"
    assert final.usage.output_tokens == 5


def test_incomplete_when_max_output_tokens_runs_out(gw: GatewayUnderTest) -> None:
    client = gw.client()
    response = client.responses.create(model="gpt-echo", input="x", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "The answer"
    events = list(
        client.responses.create(model="gpt-echo", input="x", max_output_tokens=2, stream=True)
    )
    sequence_ok(events)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_reasoning_item(gw: GatewayUnderTest) -> None:
    response = gw.client().responses.create(model="rsp/think", input="x")
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].content[0].text == "Let me think."
    assert response.output_text == "Done."


# ---- Responses: function calls -----------------------------------------------------------


def test_function_call_round_trip(gw: GatewayUnderTest) -> None:
    client = gw.client()
    first = client.responses.create(model="rsp/tools", input=QUESTION, tools=TOOLS, store=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id
    second = client.responses.create(
        model="rsp/tools",
        tools=TOOLS,
        store=False,
        input=[
            {"role": "user", "content": QUESTION},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": [{"type": "input_text", "text": "18C, sunny"}],
            },
        ],
    )
    assert second.output_text == "It is sunny in Paris."
    assert second.status == "completed"


def test_function_call_streamed(gw: GatewayUnderTest) -> None:
    events = list(
        gw.client().responses.create(model="rsp/tools", input=QUESTION, tools=TOOLS, stream=True)
    )
    sequence_ok(events)
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    assert kinds[-1] == "response.completed"
    assert events[-1].response.output[0].type == "function_call"


# ---- Responses: keep-alives, failures, refusals --------------------------------------------


def test_keepalive_comments_during_a_cold_load(gw: GatewayUnderTest) -> None:
    answer = httpx.post(
        f"{gw.url}/v1/responses",
        json={"model": "rsp/cold", "input": "x", "stream": True},
        timeout=60,
    )
    assert answer.status_code == 200
    head = answer.text[: answer.text.index("response.output_item.added")]
    assert head.count(": keep-alive") >= 2
    assert "event: response.completed" in answer.text


def test_a_mid_stream_failure_ends_with_response_failed(gw: GatewayUnderTest) -> None:
    events = list(gw.client().responses.create(model="rsp/midfail", input="x", stream=True))
    sequence_ok(events)
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "scripted failure" in events[-2].message
    # the item the deltas went into is closed (incomplete) and kept in the failed response
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.id for item in done] == added and done[-1].status == "incomplete"
    assert [item.id for item in events[-1].response.output] == added


def bad_request(gw: GatewayUnderTest, **body: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().responses.create(model="gpt-echo", input="x", **body)
    error = info.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    return info.value


def test_hosted_tools_are_dropped_and_named(gw: GatewayUnderTest) -> None:
    """[gateway] hosted_tools = "drop" (the default): Codex's web_search does not fail the
    request; the answer names what was left out. Strict mode: tests/wire/test_client_compat.py
    and the Anthropic e2e test."""
    raw = gw.client().responses.with_raw_response.create(
        model="gpt-echo", input="x", tools=[{"type": "web_search"}]
    )
    assert raw.headers["x-cortex-dropped-tools"] == "web_search"
    assert raw.parse().output_text == REPLY


def test_refusals_are_clear_400s(gw: GatewayUnderTest) -> None:
    previous = bad_request(gw, previous_response_id="resp_123")
    assert previous.body["param"] == "previous_response_id"
    assert "no conversation state" in previous.body["message"]
    stored = bad_request(gw, store=True)
    assert stored.body["param"] == "store"


def test_errors_use_the_openai_envelope(gw: GatewayUnderTest) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        gw.client().responses.create(model="nobody/knows", input="x")
    assert info.value.body["code"] == "model_not_found"
    answer = httpx.post(f"{gw.url}/v1/responses", content=b"[]", timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


# ---- chat completions: tool calls and reasoning through the gateway ------------------------


def test_chat_tool_calls_whole_and_streamed(gw: GatewayUnderTest) -> None:
    client = gw.client()
    ask = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="rsp/tools", messages=ask, tools=CHAT_TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(
        client.chat.completions.create(
            model="rsp/tools", messages=ask, tools=CHAT_TOOLS, stream=True
        )
    )
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls"


def test_chat_reasoning_content_never_leaks_into_content(gw: GatewayUnderTest) -> None:
    client = gw.client()
    ask = [{"role": "user", "content": "x"}]
    message = client.chat.completions.create(model="rsp/think", messages=ask).choices[0].message
    assert message.content == "Done."
    assert message.model_extra["reasoning_content"] == "Let me think."
    chunks = list(client.chat.completions.create(model="rsp/think", messages=ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Done."
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "Let me think."
