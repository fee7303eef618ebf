"""Neuron support for the translated dialects: the matched stop sequence, the max_tokens clamp
extension, and reasoning when the prompt itself opens ``<think>``."""

from __future__ import annotations

import json

from tests.neuron.conftest import ECHO_REPLY, LiveNeuron

ASK = [{"role": "user", "content": "hi"}]


def test_the_matched_stop_string_is_reported(neuron: LiveNeuron) -> None:
    neuron.load("acme/echo")
    with neuron.http() as client:
        whole = client.post(
            "/v1/chat/completions",
            json={"model": "acme/echo", "messages": ASK, "stop": ["zzz", "cat"]},
        ).json()
        plain = client.post(
            "/v1/chat/completions", json={"model": "acme/echo", "messages": ASK}
        ).json()
        streamed = client.post(
            "/v1/chat/completions",
            json={"model": "acme/echo", "messages": ASK, "stop": ["cat"], "stream": True},
        ).text
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_sequence"] == "cat"
    assert choice["message"]["content"] == ECHO_REPLY[: ECHO_REPLY.index("cat")]
    assert plain["choices"][0]["stop_sequence"] is None  # ended by EOS, not a stop string
    chunks = [
        json.loads(line[6:])
        for line in streamed.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_sequence"] == "cat"


def test_clamp_extension_turns_an_oversized_budget_into_the_context_left(
    neuron: LiveNeuron,
) -> None:
    neuron.load("acme/echo")
    body = {"model": "acme/echo", "messages": ASK, "max_tokens": 32000}
    with neuron.http() as client:
        refused = client.post("/v1/chat/completions", json=body)
        clamped = client.post(
            "/v1/chat/completions", json={**body, "cortex": {"clamp_max_tokens": True}}
        )
        unknown = client.post("/v1/chat/completions", json={**body, "cortex": {"nope": True}})
        not_bool = client.post(
            "/v1/chat/completions", json={**body, "cortex": {"clamp_max_tokens": "yes"}}
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["choices"][0]["message"]["content"] == ECHO_REPLY
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]
    assert not_bool.status_code == 400 and not_bool.json()["error"]["param"] == "cortex"


def test_a_prompt_that_opens_think_keeps_reasoning_out_of_content(neuron: LiveNeuron) -> None:
    neuron.load("acme/think-echo")
    client = neuron.openai()
    whole = client.chat.completions.create(model="acme/think-echo", messages=ASK)
    message = whole.choices[0].message
    assert message.content == "The answer."
    assert message.model_extra["reasoning_content"] == "Let me see."
    chunks = list(
        client.chat.completions.create(model="acme/think-echo", messages=ASK, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert content == "The answer."
    assert reasoning == "Let me see."
    assert "</think>" not in content
