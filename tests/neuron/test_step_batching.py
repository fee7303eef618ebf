"""Several decode steps per device-worker job: the same tokens in fewer hand-offs (fair turns
between streams: test_generation.py::test_two_streams_on_one_device_interleave).

The neuron runs in this process, so the batching knobs of ``cortex.neuron.generation`` are set
per test with ``monkeypatch`` (a generous time budget makes the step count, not the machine's
load, decide how many tokens one job runs)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from cortex.neuron import generation
from cortex.testing.registry import publish_repo, start_registry
from tests.neuron.conftest import LiveNeuron, echo_repo, neuron_config, start_neuron

LLAMA = "huggingface:acme/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the old bridge."}]


@pytest.fixture(scope="module")
def loaded(neuron: LiveNeuron) -> LiveNeuron:
    neuron.load("acme/tiny-llama")
    return neuron


def stream_text(neuron: LiveNeuron, max_tokens: int) -> tuple[str, int]:
    """The streamed text and the completion tokens the final usage chunk reports."""
    stream = neuron.openai().chat.completions.create(
        model=LLAMA,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, produced = [], 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return "".join(parts), produced


def worker_jobs(neuron: LiveNeuron) -> int:
    worker = neuron.node.workers.get("cpu")
    assert worker is not None
    neuron.wait_for(lambda: worker.queue_depth == 0, timeout=5)
    return worker.jobs_done


def test_batched_steps_give_the_same_tokens_in_fewer_jobs(
    loaded: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    before = worker_jobs(loaded)
    one_per_job, produced_single = stream_text(loaded, 48)
    single_jobs = worker_jobs(loaded) - before

    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    before = worker_jobs(loaded)
    batched, produced_batched = stream_text(loaded, 48)
    batched_jobs = worker_jobs(loaded) - before

    assert batched == one_per_job and produced_batched == produced_single == 48
    # the same fixed jobs (render, start, final flush, close) around 48 step jobs, against
    # the prefill alone, then ceil(47 / 16) = 3 jobs
    assert single_jobs - batched_jobs == 48 - (1 + 3)


def test_max_tokens_is_exact_when_not_a_multiple_of_the_batch(
    loaded: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 4)
    for max_tokens in (1, 2, 6, 7):
        _, produced = stream_text(loaded, max_tokens)
        assert produced == max_tokens


@pytest.fixture(scope="module")
def failing_neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNeuron]:
    """An instant echo model whose step raises after 5 tokens (a harness error mid-batch)."""
    root = tmp_path_factory.mktemp("failing-repos")
    reply = " ".join(f"word{i}" for i in range(20))
    publish_repo(root, "acme/fails", echo_repo(reply=reply, fail_after=5))
    registry = start_registry(root)
    live = start_neuron(neuron_config(registry.url, tmp_path_factory.mktemp("failing-cache")))
    live.load("acme/fails")
    yield live
    live.stop()
    registry.stop()


def text_until_error(neuron: LiveNeuron) -> tuple[str, str]:
    stream = neuron.openai().chat.completions.create(
        model="huggingface:acme/fails", messages=MESSAGES, stream=True
    )
    parts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    return "".join(parts), str(caught.value)


def test_an_error_after_good_steps_still_delivers_their_tokens(
    failing_neuron: LiveNeuron, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "JOB_TIME_BUDGET_S", 10.0)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 1)
    one_per_job = text_until_error(failing_neuron)
    monkeypatch.setattr(generation, "MAX_STEPS_PER_JOB", 16)
    batched = text_until_error(failing_neuron)
    assert batched == one_per_job
    assert batched[0].startswith("word0 word1") and "word5" not in batched[0]
    assert "scripted failure" in batched[1]
