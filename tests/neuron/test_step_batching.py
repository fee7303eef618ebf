"""Several decode steps per device-worker job: the same tokens in fewer hand-offs (fair turns
between streams: test_generation.py::test_two_streams_on_one_device_interleave).

The neuron runs in this process, so the batching knobs of ``cortex.neuron.generation`` are set
per test with ``monkeypatch`` (a generous time budget makes the step count, not the machine's
load, decide how many tokens one job runs)."""

from __future__ import annotations

import pytest

from cortex.neuron import generation
from tests.neuron.conftest import LiveNeuron

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
