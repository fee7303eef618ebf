"""Tools reach the chat template, and tool calls in the output come back as OpenAI tool_calls."""

from __future__ import annotations

import json

from tests.neuron.conftest import LiveNeuron

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_calls_come_back_typed(neuron: LiveNeuron) -> None:
    neuron.load("acme/tool-echo")
    client = neuron.openai()
    response = client.chat.completions.create(model="acme/tool-echo", messages=ASK, tools=TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")

    chunks = list(
        client.chat.completions.create(
            model="acme/tool-echo", messages=ASK, tools=TOOLS, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # the tool result goes back in; the model answers in text
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"},
    ]
    final = client.chat.completions.create(model="acme/tool-echo", messages=follow_up, tools=TOOLS)
    assert final.choices[0].message.content == "It is sunny."
    assert final.choices[0].finish_reason == "stop"


def test_calls_cut_by_max_tokens_finish_with_length(neuron: LiveNeuron) -> None:
    """Two calls, the second cut by max_tokens: the answer finishes with ``length`` (not
    ``tool_calls``, which would invite a client to run an unfinished answer's calls), whole
    and streamed; the finished call still comes back typed."""
    neuron.load("acme/two-tool-echo")
    client = neuron.openai()
    full = client.chat.completions.create(model="acme/two-tool-echo", messages=ASK, tools=TOOLS)
    assert full.choices[0].finish_reason == "tool_calls"
    assert len(full.choices[0].message.tool_calls or []) == 2
    cut = full.usage.completion_tokens - 3  # type: ignore[union-attr]  # inside the second call
    whole = client.chat.completions.create(
        model="acme/two-tool-echo", messages=ASK, tools=TOOLS, max_tokens=cut
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "length", choice
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]
    chunks = list(
        client.chat.completions.create(
            model="acme/two-tool-echo", messages=ASK, tools=TOOLS, max_tokens=cut, stream=True
        )
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and "tool_calls" not in finishes


def test_tools_are_rendered_by_the_chat_template(neuron: LiveNeuron) -> None:
    neuron.load("acme/tiny-llama")
    with neuron.http() as client:
        plain = client.post("/tokenize", json={"model": "acme/tiny-llama", "messages": ASK})
        with_tools = client.post(
            "/tokenize", json={"model": "acme/tiny-llama", "messages": ASK, "tools": TOOLS}
        )
    assert with_tools.json()["count"] > plain.json()["count"] + 20
    # tool_choice "none" means the tools are not offered
    reply = neuron.openai().chat.completions.create(
        model="acme/tiny-llama",
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=1,
        temperature=0,
    )
    assert reply.usage.prompt_tokens == plain.json()["count"]


def test_tool_call_arguments_with_a_lone_surrogate_are_a_400(neuron: LiveNeuron) -> None:
    """Arguments are JSON inside a JSON string: the body holds ``\\\\ud800`` (six characters,
    valid Unicode), and only decoding the arguments for the template makes the lone surrogate
    (what a client's ``json.dumps`` writes for such a value). It was a 500 from the tokenizer,
    whole and streamed; an escaped pair in the same place stays fine (issue 22, item 1)."""
    neuron.load("acme/tiny-llama")

    def history(arguments: str) -> list[dict[str, object]]:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }
        return [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]

    lone = history(json.dumps({"city": "Par\ud800is"}))
    pair = history(json.dumps({"city": "Par\U0001f600is"}))
    assert "\\ud800" in lone[1]["tool_calls"][0]["function"]["arguments"]  # type: ignore[index]
    with neuron.http() as client:
        for route, extra in (
            ("/tokenize", {}),
            ("/v1/chat/completions", {"max_tokens": 2}),
            ("/v1/chat/completions", {"max_tokens": 2, "stream": True}),
        ):
            body = {"model": "acme/tiny-llama", "messages": lone, **extra}
            answer = client.post(route, json=body)
            assert answer.status_code == 400, (route, extra, answer.status_code, answer.text)
            error = answer.json()["error"]
            assert "lone surrogate" in error["message"], error
            fine = client.post(route, json={**body, "messages": pair})
            assert fine.status_code == 200, (route, extra, fine.text)
