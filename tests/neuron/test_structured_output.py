"""Structured output through a real neuron with the official ``openai`` SDK: ``parse`` with a
pydantic model gets a validated object from a random-weight model (the grammar masks every
token that would break the schema), whole and streamed; ``json_object`` gives a JSON object; a
schema the engine cannot compile and a harness that cannot enforce one are typed 400s."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pydantic
import pytest

from tests.neuron.conftest import LiveNeuron

LLAMA = "huggingface:acme/tiny-llama"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false

    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[pydantic.constr(max_length=6)] = pydantic.Field(max_length=3)  # type: ignore[valid-type]


@pytest.fixture(scope="module")
def loaded(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-llama")
    neuron.load("acme/echo")
    return neuron


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_parse_returns_a_validated_object(loaded: LiveNeuron, temperature: float) -> None:
    completion = loaded.openai().chat.completions.parse(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=200,
        temperature=temperature,
        seed=3,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    Person.model_validate_json(message.content or "")


def test_a_streamed_answer_follows_the_schema_too(loaded: LiveNeuron) -> None:
    with loaded.openai().chat.completions.stream(
        model=LLAMA,
        messages=ASK,
        response_format=Person,
        max_tokens=200,
        temperature=0,  # type: ignore[arg-type]
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_json_object_gives_a_json_object(loaded: LiveNeuron) -> None:
    answer = loaded.openai().chat.completions.create(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    if answer.choices[0].finish_reason == "stop":  # a random model may run out of tokens
        assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    else:
        assert (answer.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize(
    ("model", "response_format", "param"),
    [
        (
            LLAMA,
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
            "response_format",
        ),
        (
            LLAMA,
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
        (LLAMA, {"type": "xml"}, "response_format"),
        ("huggingface:acme/echo", {"type": "json_object"}, "response_format"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_the_part(
    loaded: LiveNeuron, model: str, response_format: dict, param: str
) -> None:
    body = {"model": model, "messages": ASK, "max_tokens": 5, "response_format": response_format}
    answer = httpx.post(f"{loaded.url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_models_say_what_each_model_can_do(loaded: LiveNeuron) -> None:
    models = loaded.models()
    assert models[LLAMA]["capabilities"] == ["chat", "logprobs", "structured_output", "tools"]
    assert models["huggingface:acme/echo"]["capabilities"] == ["chat", "logprobs", "tools"]
