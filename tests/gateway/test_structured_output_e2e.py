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
