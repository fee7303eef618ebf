"""Continuous batching in the torch harness, driven by the neuron's real scheduler on this thread.

Eight prompts of different lengths join the batch at different iterations (their prompts
prefilled in chunks beside running decodes), some leave early (max_tokens, a cancel); each must
produce, token for token, what transformers' ``generate()`` produces for it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cortex_harness_torch.batched import BatchedTorchModel
from cortex_harness_torch.harness import TorchHarness

from cortex.devices import cpu_device
from cortex.harness import LoadOptions, SamplingParams, is_batched
from cortex.neuron.scheduler import Scheduler
from cortex.testing.batching import TEXTS, collected, drive, sequence, step


def reference(model: BatchedTorchModel, prompt: list[int], n: int) -> list[int]:
    """What ``generate(do_sample=False)`` makes alone (stopping at EOS, like the scheduler)."""
    import torch

    ids = torch.tensor([prompt])
    out = model.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> Any:
    directory = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    loaded = TorchHarness().load(directory, cpu_device(), LoadOptions(max_batch=6))
    assert isinstance(loaded, BatchedTorchModel) and is_batched(loaded)
    yield loaded
    loaded.unload()


def test_streams_joining_and_leaving_match_generate_alone(model: BatchedTorchModel) -> None:
    greedy = SamplingParams(temperature=0)
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
    max_tokens = [40, 24, 40, 7, 40, 33, 40, 12]
    sequences = [sequence(model, p, n, greedy) for p, n in zip(prompts, max_tokens, strict=True)]
    # a small token budget: long prompts are prefilled in chunks beside running decodes; six
    # rows at most, so two of the eight wait for a running one to leave
    scheduler = Scheduler(max_batch_tokens=24)
    arrivals = {0: sequences[:3], 2: sequences[3:5], 5: sequences[5:7], 9: sequences[7:]}
    model.prefixes.clear()
    drive(scheduler, arrivals)
    for seq, prompt, n in zip(sequences, prompts, max_tokens, strict=True):
        sink = collected(seq)
        assert sink.error is None
        assert sink.tokens == reference(model, prompt, n)[: len(sink.tokens)]
        assert sink.finish in ("length", "stop")
        assert len(sink.tokens) == n or sink.finish == "stop"
    assert model.stats.forward_passes > 0
    assert not model._running and not model._rows.allocated  # every row freed


def test_a_cancelled_row_frees_its_place_at_the_next_iteration(model: BatchedTorchModel) -> None:
    greedy = SamplingParams(temperature=0)
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS[:3]]
    sequences = [sequence(model, p, 40, greedy) for p in prompts]
    scheduler = Scheduler()
    for seq in sequences:
        scheduler.add(seq)
    for _ in range(5):
        step(scheduler)
    assert scheduler.load_of(model).running == 3
    sequences[1].cancelled = True
    step(scheduler)
    load = scheduler.load_of(model)
    assert load.running == 2 and len(model._running) == 2
    assert load.kv_tokens_reserved == sum(s.reservation for s in (sequences[0], sequences[2]))
    assert sequences[1].generation.closed  # type: ignore[attr-defined]
    while scheduler.has_work:
        step(scheduler)
    for i in (0, 2):
        sink = collected(sequences[i])
        assert sink.tokens == reference(model, prompts[i], 40)[: len(sink.tokens)]


def test_seeded_sampling_in_a_batch_equals_sampling_alone(model: BatchedTorchModel) -> None:
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS[:4]]
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=20, seed=11, presence_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=1.3),
    ]

    def run(indices: list[int]) -> dict[int, list[int]]:
        seqs = {i: sequence(model, prompts[i], 20, params[i]) for i in indices}
        drive(Scheduler(), {0: list(seqs.values())})
        return {i: collected(s).tokens for i, s in seqs.items()}

    together = run([0, 1, 2, 3])
    for i in range(4):
        assert together[i] == run([i])[i]


def test_a_shared_prompt_prefix_is_evaluated_once(model: BatchedTorchModel) -> None:
    """A conversation that grows by a turn reuses the KV of the previous turn (saved when it
    ended); a request that starts like a running one copies that row's KV."""
    model.prefixes.clear()
    greedy = SamplingParams(temperature=0)
    turn = [{"role": "user", "content": TEXTS[1]}]
    first = model.render_chat(turn)
    seq = sequence(model, first, 10, greedy)
    drive(Scheduler(), {0: [seq]})
    answer = model.decode(collected(seq).tokens)
    second = model.render_chat(
        [*turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "red"}]
    )
    before = model.stats.prompt_tokens_reused
    follow = sequence(model, second, 10, greedy)
    drive(Scheduler(), {0: [follow]})
    reused = model.stats.prompt_tokens_reused - before
    assert reused >= len(first) - 1
    tokens = collected(follow).tokens
    assert tokens == reference(model, second, 10)[: len(tokens)]


def test_memory_counts_the_kv_cache_at_capacity(tiny_llama_dir: Path) -> None:
    """The node's ledger must hold room for the KV cache the batch grows into, from the load
    on: weights plus (kv_tokens + the saved prefixes' budget) positions."""
    loaded = TorchHarness().load(
        tiny_llama_dir, cpu_device(), LoadOptions(max_batch=4, kv_tokens=2048)
    )
    try:
        assert isinstance(loaded, BatchedTorchModel)
        weights = sum(t.numel() * t.element_size() for t in loaded.model.parameters())
        weights += sum(t.numel() * t.element_size() for t in loaded.model.buffers())
        per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 KV heads, 16 dims, float32
        prefixes = max(256, 2048 // 4)
        assert loaded.memory_bytes() == weights + (2048 + prefixes) * per_token
    finally:
        loaded.unload()


def test_rows_of_one_batch_keep_their_own_constraints(model: BatchedTorchModel) -> None:
    """Structured output inside continuous batching: each row decodes under its own grammar
    (or none); a constrained row's answer validates, the free row gives what it gives alone."""
    import json

    from cortex.harness import ResponseFormat

    ages = {"type": "object", "properties": {"age": {"type": "integer", "maximum": 99}}}
    ages |= {"required": ["age"], "additionalProperties": False}
    names = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}}
    names |= {"required": ["name"], "additionalProperties": False}
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS[:3]]
    params = [
        SamplingParams(
            temperature=0, response_format=ResponseFormat("json_schema", json.dumps(ages))
        ),
        SamplingParams(
            temperature=0.8,
            seed=2,
            response_format=ResponseFormat("json_schema", json.dumps(names)),
        ),
        SamplingParams(temperature=0),
    ]
    seqs = [sequence(model, p, 80, s) for p, s in zip(prompts, params, strict=True)]
    drive(Scheduler(), {0: seqs})
    assert set(json.loads(collected(seqs[0]).text)) == {"age"}
    assert set(json.loads(collected(seqs[1]).text)) == {"name"}
    assert (
        collected(seqs[2]).tokens
        == reference(model, prompts[2], 80)[: len(collected(seqs[2]).tokens)]
    )
