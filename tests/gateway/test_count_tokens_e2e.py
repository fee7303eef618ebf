"""``POST /v1/messages/count_tokens``: the neuron's real count of the rendered prompt."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.wire.anthropic import parse_count_tokens_request

TOOLS = [
    {
        "name": "get_weather",
        "description": "weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


@pytest.fixture
def gw(fleet: Fleet) -> GatewayUnderTest:
    fleet.publish_echo("cnt/echo", reply="hi", memory_mb=10)
    return fleet.gateway(
        models=[ModelProfile(id="cnt/echo", memory_mb=10)], aliases={"claude-count": "cnt/echo"}
    )


def neuron_count(fleet: Fleet, body: dict) -> int:
    """Ask the neuron that holds the model directly, with the same translated body."""
    tokenize = parse_count_tokens_request(body).tokenize
    for name in fleet.neurons:
        if "huggingface:cnt/echo" in fleet.neuron_models(name):
            answer = httpx.post(
                f"{fleet.neuron_url(name)}/tokenize",
                json={**tokenize, "model": "huggingface:cnt/echo"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            return int(answer.json()["count"])
    raise AssertionError("the model is loaded nowhere")


def test_count_equals_the_neurons_tokenize_count(fleet: Fleet, gw: GatewayUnderTest) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    request = {
        "model": "claude-count",
        "system": "be brief",
        "messages": [{"role": "user", "content": "one two three four"}],
    }
    counted = client.messages.count_tokens(**request)  # cold: the model is loaded first
    assert counted.input_tokens == neuron_count(fleet, request)
    with_tools = client.messages.count_tokens(**request, tools=TOOLS)
    assert with_tools.input_tokens == neuron_count(fleet, {**request, "tools": TOOLS})
    assert with_tools.input_tokens > counted.input_tokens  # the tools reach the template
    # the same number a real request reports as input_tokens
    message = client.messages.create(**request, max_tokens=8)
    assert message.usage.input_tokens == counted.input_tokens


def test_count_tokens_errors_use_the_anthropic_envelope(gw: GatewayUnderTest) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.count_tokens(
            model="nobody/knows", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.count_tokens(model="claude-count", messages=[])
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
