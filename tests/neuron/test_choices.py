"""``n`` choices of one prompt through a real neuron with the official ``openai`` SDK: each
choice is a generation of its own on the device (they follow the first, reusing the KV of its
prompt), answers carry one choice per index, usage counts the prompt once and every choice's
tokens, and a stream interleaves the choices' frames."""

from __future__ import annotations

from collections import defaultdict

from tests.neuron.conftest import ECHO_REPLY, LiveNeuron

LLAMA = "huggingface:acme/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the old bridge."}]


def test_n_choices_whole(neuron: LiveNeuron) -> None:
    neuron.load("acme/tiny-llama")
    client = neuron.openai()
    greedy = client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        n=3,  # type: ignore[arg-type]
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    texts = {c.message.content for c in greedy.choices}
    assert len(texts) == 1  # greedy: the same answer three times (as OpenAI gives)
    one = client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    assert texts == {one.choices[0].message.content}
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens  # type: ignore[union-attr]
    assert greedy.usage.completion_tokens == 3 * 12  # type: ignore[union-attr]
    sampled = client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=12,
        temperature=1.0,
        seed=5,
        n=3,  # type: ignore[arg-type]
    )
    again = client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=12,
        temperature=1.0,
        seed=5,
        n=3,  # type: ignore[arg-type]
    )
    answers = [c.message.content for c in sampled.choices]
    assert answers == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(answers)) > 1  # each choice its own seed: they differ


def test_n_choices_streamed(neuron: LiveNeuron) -> None:
    neuron.load("acme/tiny-llama")
    client = neuron.openai()
    whole = client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=10,
        temperature=1.0,
        seed=9,
        n=2,  # type: ignore[arg-type]
    )
    parts: dict[int, list[str]] = defaultdict(list)
    finishes: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=1.0,
        seed=9,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                parts[choice.index].append(choice.delta.content)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert ["".join(parts[i]) for i in (0, 1)] == [c.message.content for c in whole.choices]
    assert finishes == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 20


def test_n_completions(neuron: LiveNeuron) -> None:
    neuron.load("acme/echo")
    answer = neuron.openai().completions.create(model="huggingface:acme/echo", prompt="hi", n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.text for c in answer.choices] == [ECHO_REPLY] * 2
    chat = neuron.openai().chat.completions.create(
        model="huggingface:acme/echo", messages=[{"role": "user", "content": "x"}], n=4
    )
    assert [c.message.content for c in chat.choices] == [ECHO_REPLY] * 4
    # one request in flight, ended once: nothing left counted
    assert neuron.models()["huggingface:acme/echo"]["in_flight"] == 0
