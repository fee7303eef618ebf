"""Anthropic Messages through a real gateway and real neurons, with the official SDK (sync and
async, ``messages.create`` and ``messages.stream``) and raw HTTP where the wire matters."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from cortex.auth import GatewayAuth
from cortex.config import (
    AuthSection,
    CortexConfig,
    Duration,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
)
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.registry import publish_repo
from cortex.testing.servers import UvicornThread

REPLY = "The answer is 42."
SLOW_REPLY = "one two three four five six"
TOOLS = [
    {
        "name": "get_weather",
        "description": "weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
ASK = [{"role": "user", "content": "what is it?"}]
# This SDK version has no temperature/top_k arguments; the wire fields still work.
GREEDY = {"temperature": 0, "top_k": 1}


def publish_models(fleet: Fleet) -> list[ModelProfile]:
    fleet.publish_echo("ant/echo", reply=REPLY, memory_mb=10)
    fleet.publish_echo(
        "ant/tools",
        reply="It is sunny in Paris.",
        memory_mb=10,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    fleet.publish_echo("ant/think", reply="Done.", reasoning="Let me think.", memory_mb=10)
    fleet.publish_echo("ant/slow", reply=SLOW_REPLY, tokens_per_second=3, memory_mb=10)
    fleet.publish_echo("ant/cold", reply=REPLY, load_seconds=1.0, memory_mb=10)
    fleet.publish_echo("ant/broken", reply=REPLY, fail_after=0, memory_mb=10)
    fleet.publish_echo("ant/midfail", reply=SLOW_REPLY, fail_after=2, memory_mb=10)
    names = ("echo", "tools", "think", "slow", "cold", "broken", "midfail")
    return [ModelProfile(id=f"ant/{name}", memory_mb=10) for name in names]


def start_gateway(fleet: Fleet, **settings: Any) -> GatewayUnderTest:
    return fleet.gateway(
        models=publish_models(fleet),
        aliases={"claude-echo": "ant/echo"},
        stream_keepalive=Duration(0.2),
        **settings,
    )


@pytest.fixture
def gw(fleet: Fleet) -> GatewayUnderTest:
    return start_gateway(fleet)


def claude(gw: GatewayUnderTest, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, **kwargs)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE body."""
    events = []
    for frame in text.split("\n\n"):
        lines = frame.strip().splitlines()
        event = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if event and data:
            events.append((event, json.loads(data)))
    return events


def drain(client: anthropic.Anthropic, **request: Any) -> str:
    """The text of a ``messages.stream`` (raises what the stream raises)."""
    with client.messages.stream(**request) as stream:
        return "".join(stream.text_stream)


def post_stream(gw: GatewayUnderTest, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", json={**body, "stream": True}, timeout=60)


# ---- plain text ------------------------------------------------------------------------------


def test_text_with_both_system_forms_sync(gw: GatewayUnderTest) -> None:
    client = claude(gw)
    raw = client.messages.with_raw_response.create(
        model="claude-echo", max_tokens=64, system="be exact", messages=ASK
    )
    message = raw.parse()
    assert message.model == "claude-echo"  # what the client asked for, not the canonical id
    assert raw.headers["x-cortex-model"] == "huggingface:ant/echo"
    assert raw.headers["x-cortex-node"] in ("n1", "n2", "n3")
    assert [(b.type, b.text) for b in message.content] == [("text", REPLY)]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == 5  # "The" " answer" " is" " 42." and EOS
    blocks = client.messages.create(
        model="claude-echo",
        max_tokens=64,
        system=[{"type": "text", "text": "be exact"}, {"type": "text", "text": "be brief"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}]}],
    )
    assert blocks.content[0].text == REPLY
    # the system prompt reaches the model: one system message more, more prompt tokens
    assert blocks.usage.input_tokens > message.usage.input_tokens


def test_streaming_with_messages_stream_sync(gw: GatewayUnderTest) -> None:
    with claude(gw).messages.stream(
        model="claude-echo", max_tokens=64, system="be exact", messages=ASK
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.model == "claude-echo"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens > 0


def test_async_client_create_and_stream(gw: GatewayUnderTest) -> None:
    async def run() -> tuple[str, str, str]:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
        message = await client.messages.create(model="claude-echo", max_tokens=64, messages=ASK)
        async with client.messages.stream(
            model="claude-echo", max_tokens=64, messages=ASK
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        await client.close()
        return message.content[0].text, text, final.stop_reason

    assert asyncio.run(run()) == (REPLY, REPLY, "end_turn")


def test_wire_event_sequence(gw: GatewayUnderTest) -> None:
    answer = post_stream(gw, {"model": "claude-echo", "max_tokens": 64, "messages": ASK})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    kinds = [event for event, _ in sse_events(answer.text) if event != "ping"]
    assert kinds[0] == "message_start"
    assert kinds[1] == "content_block_start"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for event, data in sse_events(answer.text):
        assert data["type"] == event


# ---- stop sequences and max_tokens -----------------------------------------------------------


def test_stop_sequence_is_reported_whole_and_streamed(gw: GatewayUnderTest) -> None:
    client = claude(gw)
    message = client.messages.create(
        model="claude-echo", max_tokens=64, stop_sequences=["zz", "42"], messages=ASK
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "42"
    assert message.content[0].text == "The answer is "
    with client.messages.stream(
        model="claude-echo", max_tokens=64, stop_sequences=["answer"], messages=ASK
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "The "
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "answer")


def test_max_tokens_whole_and_streamed(gw: GatewayUnderTest) -> None:
    client = claude(gw)
    message = client.messages.create(model="claude-echo", max_tokens=2, messages=ASK)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].text == "The answer"
    assert message.usage.output_tokens == 2
    with client.messages.stream(model="claude-echo", max_tokens=3, messages=ASK) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


def test_claude_codes_huge_max_tokens_is_clamped_not_refused(gw: GatewayUnderTest) -> None:
    """Claude Code sends max_tokens=32000; the echo model's context is 4096."""
    assert drain(claude(gw), model="claude-echo", max_tokens=32000, messages=ASK) == REPLY
    # (the SDK insists on streaming for such budgets; raw HTTP shows the whole answer too)
    whole = httpx.post(
        f"{gw.url}/v1/messages",
        json={"model": "claude-echo", "max_tokens": 32000, "messages": ASK},
        timeout=30,
    )
    assert whole.status_code == 200, whole.text
    assert whole.json()["content"] == [{"type": "text", "text": REPLY}]
    # the OpenAI route keeps the 400 the OpenAI API gives
    chat = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "claude-echo", "max_tokens": 32000, "messages": ASK},
        timeout=30,
    )
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "context_length_exceeded"


# ---- tools -----------------------------------------------------------------------------------


def test_tool_round_trip(gw: GatewayUnderTest) -> None:
    client = claude(gw)
    question = [{"role": "user", "content": "weather in Paris?"}]
    first = client.messages.create(
        model="ant/tools", max_tokens=128, tools=TOOLS, messages=question
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id
    history = [
        *question,
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    second = client.messages.create(
        model="ant/tools", max_tokens=128, tools=TOOLS, messages=history
    )
    assert second.stop_reason == "end_turn"
    assert second.content[-1].text == "It is sunny in Paris."

    # streamed: a tool_use block with input_json_delta, stop_reason tool_use
    with client.messages.stream(
        model="ant/tools",
        max_tokens=128,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=question,
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert (streamed.name, streamed.input) == ("get_weather", {"city": "Paris"})
    raw = post_stream(
        gw, {"model": "ant/tools", "max_tokens": 64, "tools": TOOLS, "messages": question}
    )
    deltas = [d["delta"] for e, d in sse_events(raw.text) if e == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}


def test_tool_choice_none_sends_no_tools_so_the_model_answers_in_text(gw: GatewayUnderTest) -> None:
    message = claude(gw).messages.create(
        model="ant/tools",
        max_tokens=128,
        tools=TOOLS,
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )
    assert message.stop_reason == "end_turn"
    assert message.content[0].text == "It is sunny in Paris."


def test_thinking_comes_back_as_a_thinking_block_only_when_enabled(gw: GatewayUnderTest) -> None:
    client = claude(gw)
    plain = client.messages.create(model="ant/think", max_tokens=64, messages=ASK)
    assert [(b.type, b.text) for b in plain.content] == [("text", "Done.")]
    thought = client.messages.create(
        model="ant/think",
        max_tokens=64,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=ASK,
    )
    assert [b.type for b in thought.content] == ["thinking", "text"]
    assert thought.content[0].thinking == "Let me think."


# ---- keep-alives and failures mid-stream -----------------------------------------------------


def test_pings_while_the_upstream_is_quiet(gw: GatewayUnderTest) -> None:
    answer = post_stream(gw, {"model": "ant/slow", "max_tokens": 64, "messages": ASK})
    events = sse_events(answer.text)
    kinds = [event for event, _ in events]
    assert kinds.count("ping") >= 3  # 3 tokens/s, keep-alive 0.2 s
    text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == SLOW_REPLY
    assert kinds[-1] == "message_stop"


def test_pings_during_a_cold_load(gw: GatewayUnderTest) -> None:
    started = time.monotonic()
    answer = post_stream(gw, {"model": "ant/cold", "max_tokens": 64, "messages": ASK})
    assert time.monotonic() - started >= 1.0  # the load really took its time
    kinds = [event for event, _ in sse_events(answer.text)]
    assert kinds[0] == "message_start"
    first_block = kinds.index("content_block_start")
    assert kinds[:first_block].count("ping") >= 2
    assert kinds[-1] == "message_stop"
    # the anthropic SDK takes the same stream in its stride
    with claude(gw).messages.stream(model="ant/cold", max_tokens=64, messages=ASK) as stream:
        assert "".join(stream.text_stream) == REPLY


def test_a_mid_stream_failure_ends_with_an_error_event(gw: GatewayUnderTest) -> None:
    answer = post_stream(gw, {"model": "ant/midfail", "max_tokens": 64, "messages": ASK})
    events = sse_events(answer.text)
    kinds = [event for event, _ in events]
    assert "content_block_delta" in kinds  # two tokens made it
    assert kinds[-1] == "error" and "message_stop" not in kinds
    error = events[-1][1]
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert "scripted failure" in error["error"]["message"]
    with pytest.raises(anthropic.APIStatusError):
        drain(claude(gw), model="ant/midfail", max_tokens=64, messages=ASK)


# ---- errors, each in the Anthropic envelope --------------------------------------------------


def assert_envelope(error: anthropic.APIStatusError, status: int, kind: str) -> None:
    assert error.status_code == status
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == kind
    assert error.body["error"]["message"]


def test_invalid_request_error(gw: GatewayUnderTest) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(gw).messages.create(model="claude-echo", max_tokens=0, messages=ASK)
    assert_envelope(info.value, 400, "invalid_request_error")
    answer = httpx.post(
        f"{gw.url}/v1/messages",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_server_tools_are_dropped_and_named_or_refused(gw: GatewayUnderTest, fleet: Fleet) -> None:
    """[gateway] hosted_tools: "drop" (the default) answers without the server tool and names
    it in x-cortex-dropped-tools; "refuse" answers 400 unsupported_tool."""
    request: dict[str, Any] = {
        "model": "claude-echo",
        "max_tokens": 8,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        "messages": ASK,
    }
    raw = claude(gw).messages.with_raw_response.create(**request)
    assert raw.headers["x-cortex-dropped-tools"] == "web_search_20250305"
    assert raw.parse().content[0].text == REPLY
    with claude(gw).messages.with_streaming_response.create(**request, stream=True) as streamed:
        assert streamed.headers["x-cortex-dropped-tools"] == "web_search_20250305"
    strict = fleet.gateway(
        models=publish_models(fleet), aliases={"claude-echo": "ant/echo"}, hosted_tools="refuse"
    )
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(strict).messages.create(**request)
    assert "server tool" in info.value.body["error"]["message"]
    assert info.value.response.headers["x-should-retry"] == "false"


def test_not_found_error(gw: GatewayUnderTest) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude(gw).messages.create(model="nobody/knows", max_tokens=8, messages=ASK)
    assert_envelope(info.value, 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        drain(claude(gw), model="nobody/knows", max_tokens=8, messages=ASK)


def test_api_error_from_a_failing_model(gw: GatewayUnderTest) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        claude(gw).messages.create(model="ant/broken", max_tokens=8, messages=ASK)
    assert_envelope(info.value, 500, "api_error")
    assert "scripted failure" in info.value.body["error"]["message"]


def hold_a_slow_request(gw: GatewayUnderTest) -> threading.Thread:
    """A streamed request to ant/slow (about 2 s), running until the thread ends."""
    httpx.post(  # loaded first, so the held request is generating, not loading
        f"{gw.url}/v1/messages",
        json={"model": "ant/slow", "max_tokens": 1, "messages": ASK},
        timeout=60,
    )
    thread = threading.Thread(
        target=post_stream, args=(gw, {"model": "ant/slow", "max_tokens": 64, "messages": ASK})
    )
    thread.start()
    gw.wait_for(lambda: any(gw.gateway.scheduler.usage.node_busy(n) for n in ("n1", "n2", "n3")))
    return thread


def test_rate_limit_error_when_the_model_queue_is_full(fleet: Fleet) -> None:
    gw = start_gateway(fleet, max_in_flight_per_model=1, model_queue_size=0)
    held = hold_a_slow_request(gw)
    try:
        with pytest.raises(anthropic.RateLimitError) as info:
            claude(gw).messages.create(model="ant/slow", max_tokens=8, messages=ASK)
    finally:
        held.join()
    assert_envelope(info.value, 429, "rate_limit_error")
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_overloaded_error_when_every_replica_is_at_its_limit(fleet: Fleet) -> None:
    gw = start_gateway(fleet, max_in_flight_per_node=1)
    held = hold_a_slow_request(gw)
    try:
        with pytest.raises(anthropic.APIStatusError) as info:
            claude(gw).messages.create(model="ant/slow", max_tokens=8, messages=ASK)
    finally:
        held.join()
    assert_envelope(info.value, 503, "overloaded_error")
    assert int(info.value.response.headers["retry-after"]) >= 1


@pytest.mark.slow
def test_messages_through_the_torch_harness(fleet: Fleet, tiny_llama_dir: Path) -> None:
    """A real chat template renders the translated system + user messages."""
    publish_repo(fleet.registry.root, "acme/tiny-llama", tiny_llama_dir)
    gw = fleet.gateway(
        models=[ModelProfile(id="acme/tiny-llama", harness="torch", memory_mb=200)],
        aliases={"tiny": "acme/tiny-llama"},
    )
    client = claude(gw, timeout=120)
    message = client.messages.create(
        model="tiny", max_tokens=5, system="be brief", messages=ASK, extra_body=GREEDY
    )
    assert message.model == "tiny"
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5
    counted = client.messages.count_tokens(model="tiny", system="be brief", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens
    with client.messages.stream(
        model="tiny", max_tokens=5, system="be brief", messages=ASK, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == message.content[0].text


def test_an_error_after_the_stream_began_is_an_error_event(fleet: Fleet) -> None:
    """Queued longer than a keep-alive interval, the stream has started (pings) when the
    queue timeout strikes: the 503 arrives as an overloaded_error event."""
    gw = start_gateway(fleet, max_in_flight_per_model=1, queue_timeout=Duration(0.8))
    held = hold_a_slow_request(gw)
    try:
        answer = post_stream(gw, {"model": "ant/slow", "max_tokens": 8, "messages": ASK})
    finally:
        held.join()
    assert answer.status_code == 200
    events = sse_events(answer.text)
    kinds = [event for event, _ in events]
    assert kinds[0] == "message_start" and "ping" in kinds
    assert kinds[-1] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert "stayed at its limit" in events[-1][1]["error"]["message"]


def test_x_api_key_and_bearer_are_both_accepted(fleet: Fleet, tmp_path: Path) -> None:
    """With keys configured: the SDK's api_key (x-api-key) and auth_token (Authorization:
    Bearer) both pass, anthropic-version is accepted, and no key is a 401 in the Anthropic
    envelope."""
    models = publish_models(fleet)
    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(0.2), retry_after=2),
        auth=AuthSection(keys_env="CORTEX_TEST_DIALECT_KEYS"),
        neurons=[NeuronRef(name, fleet.neuron_url(name)) for name in fleet.neurons],
    )
    gateway = Gateway(config, ModelsConfig(models=models), load_strategy("lru"))
    auth = GatewayAuth.from_config(config.auth, tmp_path, {"CORTEX_TEST_DIALECT_KEYS": "k-1,k-2"})
    server = UvicornThread(create_app(gateway, auth)).start()
    fleet.gateways.append(server)
    by_api_key = anthropic.Anthropic(base_url=server.url, api_key="k-1", max_retries=0)
    by_bearer = anthropic.Anthropic(
        base_url=server.url, api_key=None, auth_token="k-2", max_retries=0
    )
    for client in (by_api_key, by_bearer):
        message = client.messages.create(model="ant/echo", max_tokens=16, messages=ASK)
        assert message.content[0].text == REPLY
    assert by_bearer.messages.count_tokens(model="ant/echo", messages=ASK).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="ant/echo", max_tokens=16, messages=ASK
        )
    assert_envelope(info.value, 401, "authentication_error")


def test_a_client_leaving_a_kept_alive_stream_frees_everything(gw: GatewayUnderTest) -> None:
    """The client leaves during the cold load (after a ping) and again mid-relay: the
    admission slot and the in-flight counts are given back both times."""
    body = {"model": "ant/cold", "max_tokens": 64, "messages": ASK, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gw.url}/v1/messages", json=body) as response,
    ):
        for line in response.iter_lines():
            if line == "event: ping":
                break  # leave while the model is still loading
    gate = "huggingface:ant/cold"
    gw.wait_for(lambda: gw.gateway.scheduler.admission.gate(gate).active == 0)
    gw.wait_for(lambda: "huggingface:ant/cold" not in gw.gateway.scheduler.loads)  # load goes on
    slow = {"model": "ant/slow", "max_tokens": 64, "messages": ASK, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gw.url}/v1/messages", json=slow) as response,
    ):
        for line in response.iter_lines():
            if line == "event: content_block_delta":
                break  # leave mid-answer
    gw.wait_for(lambda: gw.gateway.scheduler.admission.gate("huggingface:ant/slow").active == 0)
    gw.wait_for(
        lambda: not any(gw.gateway.scheduler.usage.node_busy(n) for n in ("n1", "n2", "n3"))
    )


EPHEMERAL = {"type": "ephemeral"}


def test_a_claude_code_shaped_request(gw: GatewayUnderTest) -> None:
    """What Claude Code sends: the beta query, beta headers, system blocks with cache_control,
    metadata, many tools, a 32000-token budget, a stream."""
    body = {
        "model": "ant/tools",
        "max_tokens": 32000,
        "stream": True,
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Be concise."},
        ],
        "tools": [
            *TOOLS,
            {
                "name": "Bash",
                "description": "run a command",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {
                        "type": "text",
                        "text": "weather in Paris?",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            }
        ],
    }
    answer = httpx.post(
        f"{gw.url}/v1/messages?beta=true",
        json=body,
        headers={
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "x-api-key": "unused",
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    events = sse_events(answer.text)
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [(b["type"], b["name"]) for b in starts] == [("tool_use", "get_weather")]
    delta = next(d for e, d in events if e == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    counted = httpx.post(
        f"{gw.url}/v1/messages/count_tokens?beta=true",
        json={k: v for k, v in body.items() if k not in ("max_tokens", "stream", "metadata")},
        headers={"anthropic-version": "2023-06-01", "anthropic-beta": "token-counting-2024-11-01"},
        timeout=30,
    )
    assert counted.status_code == 200, counted.text
    assert counted.json()["input_tokens"] > 0
