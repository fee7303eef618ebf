"""The device scheduler through a real neuron over HTTP: concurrent streams of a batched model
share steps and each gets what it gets alone; a model's ``max_batch`` bounds its running
generations while the others wait in order; ``/models`` and ``/metrics`` show both; a harness
that implements only the one-sequence ``step()`` (the built-in echo harness, as a third-party
plugin might) is stepped one generation after another and serves concurrent streams too."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from cortex.harness import is_batched
from cortex.testing.batching import TEXTS
from tests.neuron.conftest import LiveNeuron

LLAMA = "huggingface:acme/tiny-llama"
SLOW = "huggingface:acme/slow-echo"


def chat(neuron: LiveNeuron, model: str, text: str, max_tokens: int) -> dict[str, Any]:
    with neuron.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
    assert response.status_code == 200, response.text
    return response.json()


def in_parallel(calls: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_streams_share_steps_and_each_equals_its_solo_run(neuron: LiveNeuron) -> None:
    entry = neuron.load("acme/tiny-llama")
    assert entry["batched"] is True and entry["max_batch"] == 32
    assert entry["kv_tokens"] >= entry["context_length"]
    handle = neuron.node.models.get(LLAMA).handle  # type: ignore[union-attr]
    assert handle is not None and is_batched(handle)
    solo = [chat(neuron, LLAMA, text, 24)["choices"][0]["message"]["content"] for text in TEXTS]
    rows = "neuron_batch_rows_bucket"
    single_before = neuron.metric(rows, device="cpu", le="1.0")
    steps_before = neuron.metric("neuron_batch_rows_count", device="cpu")
    together = in_parallel([lambda t=text: chat(neuron, LLAMA, t, 24) for text in TEXTS])
    assert [r["choices"][0]["message"]["content"] for r in together] == solo
    assert all(r["usage"]["completion_tokens"] == 24 for r in together)
    # some steps held several generations (fewer steps than tokens made)
    steps = neuron.metric("neuron_batch_rows_count", device="cpu") - steps_before
    single = neuron.metric(rows, device="cpu", le="1.0") - single_before
    assert steps < 8 * 24 and single < steps


def test_max_batch_bounds_running_generations_and_the_rest_wait(neuron: LiveNeuron) -> None:
    """slow-echo (20 tokens/s, a harness without step_batch) loaded with max_batch 2: of three
    concurrent streams two run, one waits; all three finish."""
    entry = neuron.load("acme/slow-echo", max_batch=2)
    assert (entry["max_batch"], entry["batched"], entry["kv_tokens"]) == (2, False, None)

    def stream() -> int:
        body = {"model": SLOW, "messages": [{"role": "user", "content": "go"}]}
        body |= {"max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
        usage = {}
        with (
            httpx.Client(base_url=neuron.url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        return int(usage["completion_tokens"])

    seen: list[tuple[int, int]] = []

    def watch() -> None:
        def shows_the_wait() -> bool:
            model = neuron.models()[SLOW]
            seen.append((model["running"], model["waiting"]))
            return (model["running"], model["waiting"]) == (2, 1)

        neuron.wait_for(shows_the_wait, timeout=10)
        assert neuron.metric("neuron_running_generations", model=SLOW) == 2
        assert neuron.metric("neuron_waiting_generations", model=SLOW) == 1

    results = in_parallel([stream, stream, stream, watch])
    assert results[:3] == [40, 40, 40]
    assert (2, 1) in seen
    neuron.wait_for(lambda: neuron.models()[SLOW]["running"] == 0)
    assert neuron.models()[SLOW]["waiting"] == 0


def test_bad_capacity_values_are_a_400(neuron: LiveNeuron) -> None:
    with neuron.http() as client:
        for body in ({"max_batch": 0}, {"kv_tokens": "many"}, {"max_batch": True}):
            answer = client.post("/models/load", json={"model_id": "acme/echo", **body})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] in ("max_batch", "kv_tokens")
