"""Log-probabilities through a real gateway and a real neuron with the official ``openai`` SDK:
chat and completions pass them through, Responses asks for them with ``include`` and returns
them in its output text (whole and streamed). A scripted echo token is certain (logprob 0)."""

from __future__ import annotations

import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest

REPLY = "The answer is 42."
WORDS = ["The", " answer", " is", " 42."]


@pytest.fixture
def gw(fleet: Fleet) -> GatewayUnderTest:
    fleet.publish_echo("lp/echo", reply=REPLY, memory_mb=10)
    return fleet.gateway(models=[ModelProfile(id="lp/echo", memory_mb=10)])


def test_chat_and_completions_pass_logprobs_through(gw: GatewayUnderTest) -> None:
    client = gw.client()
    chat = client.chat.completions.create(
        model="lp/echo",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [e.token for e in content] == WORDS
    assert all(e.logprob == 0.0 and e.top_logprobs[0].token == e.token for e in content)
    completion = client.completions.create(model="lp/echo", prompt="hi", logprobs=1)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == WORDS


def test_responses_include_logprobs_whole_and_streamed(gw: GatewayUnderTest) -> None:
    client = gw.client()
    response = client.responses.create(
        model="lp/echo", input="hi", include=["message.output_text.logprobs"], top_logprobs=1
    )
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert [e.token for e in part.logprobs] == WORDS  # type: ignore[union-attr]
    streamed = []
    done = None
    with client.responses.stream(
        model="lp/echo", input="hi", include=["message.output_text.logprobs"]
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed.extend(event.logprobs or [])
            if event.type == "response.output_text.done":
                done = event
    assert [e.token for e in streamed] == WORDS
    assert done is not None and [e.token for e in done.logprobs] == WORDS  # type: ignore[union-attr]
    plain = client.responses.create(model="lp/echo", input="hi")
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


def test_the_catalogue_says_what_a_loaded_model_can_do(gw: GatewayUnderTest) -> None:
    """/v1/models carries the context window and the capabilities a loaded copy reports (the
    neuron's /models), and null / empty before any copy is loaded."""
    client = gw.client()
    before = client.models.retrieve("lp/echo").model_extra or {}
    assert before["context_length"] is None and before["capabilities"] == []
    client.chat.completions.create(model="lp/echo", messages=[{"role": "user", "content": "x"}])
    gw.wait_for(lambda: (client.models.retrieve("lp/echo").model_extra or {})["context_length"])
    after = client.models.retrieve("lp/echo").model_extra or {}
    assert after["context_length"] == after["max_model_len"] == 4096  # echo's default
    assert after["max_output_tokens"] == 4095
    assert after["capabilities"] == ["chat", "logprobs", "tools"]
    assert {"tools", "logprobs", "top_logprobs"} <= set(after["supported_parameters"])
    assert "response_format" not in after["supported_parameters"]  # echo cannot enforce it
