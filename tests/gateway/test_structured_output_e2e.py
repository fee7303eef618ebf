"""Structured output through a real gateway and a neuron with the torch harness, in the three
dialects, with the official SDKs' own helpers: OpenAI ``chat.completions.parse`` and
``responses.parse`` with a pydantic model, Anthropic ``messages.create`` with
``output_config.format``. The random-weight model's answers validate: the schema travels to the
neuron as ``response_format`` and the harness decodes under it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import anthropic
import pydantic
import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.registry import publish_repo


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false

    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


ASK = [{"role": "user", "content": "Describe a person."}]


@pytest.fixture
def gw(fleet: Fleet, tiny_llama_dir: Path) -> GatewayUnderTest:
    publish_repo(fleet.registry.root, "acme/tiny-llama", tiny_llama_dir)
    return fleet.gateway(
        models=[ModelProfile(id="acme/tiny-llama", harness="torch", memory_mb=200)],
        aliases={"tiny": "acme/tiny-llama"},
    )


def test_openai_chat_and_responses_parse(gw: GatewayUnderTest) -> None:
    client = gw.client(timeout=120)
    chat = client.chat.completions.parse(
        model="tiny",
        messages=ASK,
        response_format=Person,
        max_tokens=120,
        temperature=0,  # type: ignore[arg-type]
    )
    assert isinstance(chat.choices[0].message.parsed, Person)
    response = client.responses.parse(
        model="tiny", input="Describe a person.", text_format=Person, max_output_tokens=120
    )
    assert isinstance(response.output_parsed, Person)


def test_anthropic_output_config_format(gw: GatewayUnderTest) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=120)
    message = client.messages.create(
        model="tiny",
        max_tokens=120,
        messages=ASK,  # type: ignore[arg-type]
        extra_body={
            "temperature": 0,
            "output_config": {
                "format": {"type": "json_schema", "schema": Person.model_json_schema()}
            },
        },
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    Person.model_validate(json.loads(text))


ZONE = {
    "type": "object",
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"],
    "additionalProperties": False,
}


@pytest.fixture
def gw_1k(fleet: Fleet, tmp_path: Path) -> GatewayUnderTest:
    """The tiny llama with a 1024-token context (the tools' schemas go into the prompt)."""
    from cortex.testing.tiny_models import build_tiny_model

    repo = build_tiny_model(tmp_path / "llama", context_length=1024)
    publish_repo(fleet.registry.root, "acme/tiny-llama-1k", repo)
    return fleet.gateway(
        models=[ModelProfile(id="acme/tiny-llama-1k", harness="torch", memory_mb=200)],
        aliases={"tiny": "acme/tiny-llama-1k"},
    )


def test_strict_tools_in_anthropic_and_responses(gw_1k: GatewayUnderTest) -> None:
    """Anthropic ``tool_choice: any`` with a ``strict`` tool and a Responses ``required``
    function call: the random model's call validates against the tool's schema."""
    import jsonschema

    client = anthropic.Anthropic(base_url=gw_1k.url, api_key="unused", max_retries=0, timeout=120)
    message = client.messages.create(
        model="tiny",
        max_tokens=100,
        messages=[{"role": "user", "content": "Time?"}],
        tools=[{"name": "get_time", "input_schema": ZONE, "strict": True}],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        extra_body={"temperature": 1.0},
    )
    assert message.stop_reason == "tool_use"
    calls = [block for block in message.content if block.type == "tool_use"]
    assert calls and all(c.name == "get_time" for c in calls)
    for call in calls:
        jsonschema.validate(call.input, ZONE)
    response = gw_1k.client(timeout=120).responses.create(
        model="tiny",
        input="Time?",
        tools=[{"type": "function", "name": "get_time", "parameters": ZONE, "strict": True}],
        tool_choice="required",
        max_output_tokens=100,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(c.name == "get_time" for c in calls)  # type: ignore[union-attr]
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), ZONE)  # type: ignore[union-attr]
