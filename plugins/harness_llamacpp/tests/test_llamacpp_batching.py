"""Continuous batching in the llama.cpp harness, driven by the neuron's real scheduler on this
thread: every running sequence in one ``llama_batch`` per iteration, prompts prefilled in chunks
beside running decodes, sequences joining and leaving at different iterations; each must give,
token for token, what it gives alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_harness_llamacpp.harness import LlamaCppHarness
from cortex_harness_llamacpp.model import LlamaCppModel

from cortex.devices import cpu_device
from cortex.harness import LoadOptions, SamplingParams, is_batched
from cortex.neuron.scheduler import Scheduler
from cortex.testing.batching import TEXTS, collected, drive, sequence, step

pytest.importorskip("llama_cpp")

GREEDY = SamplingParams(temperature=0.0)


def load(repo: Path, **capacity: int) -> LlamaCppModel:
    options = LoadOptions(quant="F16", extra={"n_threads": 1, "flash_attn": "off"}, **capacity)
    model = LlamaCppHarness().load(repo, cpu_device(), options)
    assert isinstance(model, LlamaCppModel) and is_batched(model)
    return model


@pytest.fixture(scope="module")
def model(tiny_gguf_repo: Path):
    loaded = load(tiny_gguf_repo, max_batch=6, kv_tokens=2048)
    yield loaded
    loaded.unload()


def alone(model: LlamaCppModel, prompt: list[int], n: int, sampling=GREEDY) -> list[int]:
    model.reset()
    generation = model.start(prompt, sampling)
    tokens = []
    try:
        for _ in range(n):
            step_ = generation.step()
            tokens.append(step_.token_id)
            if step_.is_eos:
                break
    finally:
        generation.close()
    return tokens


def test_streams_joining_and_leaving_match_their_solo_runs(model: LlamaCppModel) -> None:
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
    max_tokens = [40, 24, 40, 7, 40, 33, 40, 12]
    expected = [alone(model, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    model.reset()
    sequences = [sequence(model, p, n, GREEDY) for p, n in zip(prompts, max_tokens, strict=True)]
    batches = model.stats.batched_decodes
    # a small token budget: prompts are prefilled in chunks beside running decodes; six rows
    # at most, so two of the eight wait for a running one to leave
    iterations = drive(
        Scheduler(max_batch_tokens=24),
        {0: sequences[:3], 2: sequences[3:5], 5: sequences[5:7], 9: sequences[7:]},
    )
    for seq, want in zip(sequences, expected, strict=True):
        sink = collected(seq)
        assert sink.error is None
        assert sink.tokens == want
    # one llama_decode per iteration for all rows (a part per n_batch, never per row)
    assert model.stats.batched_decodes - batches == iterations
    assert all(slot.owner is None for slot in model._slots)


def test_a_cancelled_sequence_frees_its_slot_and_reservation_at_once(
    model: LlamaCppModel,
) -> None:
    model.reset()
    prompts = [model.tokenize(t) for t in TEXTS[:3]]
    sequences = [sequence(model, p, 40, GREEDY) for p in prompts]
    scheduler = Scheduler()
    for seq in sequences:
        scheduler.add(seq)
    for _ in range(4):
        step(scheduler)
    assert sum(s.owner is not None for s in model._slots) == 3
    sequences[1].cancelled = True
    step(scheduler)
    load_now = scheduler.load_of(model)
    assert load_now.running == 2
    assert load_now.kv_tokens_reserved == sequences[0].reservation + sequences[2].reservation
    assert sum(s.owner is not None for s in model._slots) == 2
    while scheduler.has_work:
        step(scheduler)
    for i in (0, 2):
        assert collected(sequences[i]).tokens == alone(model, prompts[i], 40)


def test_seeded_sampling_in_a_batch_equals_sampling_alone(model: LlamaCppModel) -> None:
    prompts = [model.tokenize(t) for t in TEXTS[:3]]
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(temperature=1.2, top_k=20, seed=11, presence_penalty=0.5),
        GREEDY,
    ]
    expected = [alone(model, p, 16, s) for p, s in zip(prompts, params, strict=True)]
    model.reset()
    sequences = [sequence(model, p, 16, s) for p, s in zip(prompts, params, strict=True)]
    drive(Scheduler(), {0: sequences})
    assert [collected(s).tokens for s in sequences] == expected


def test_requests_sharing_a_prompt_prefix_evaluate_it_once(model: LlamaCppModel) -> None:
    """Two requests with one long system prompt: the second copies the first's cells while it
    runs; a follow-up turn reuses the slot its conversation left."""
    model.reset()
    system = {"role": "system", "content": TEXTS[6] + " " + TEXTS[4]}
    first = model.render_chat([system, {"role": "user", "content": "red"}])
    second = model.render_chat([system, {"role": "user", "content": "green"}])
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    a, b = sequence(model, first, 12, GREEDY), sequence(model, second, 12, GREEDY)
    before = model.stats.prompt_tokens_reused
    drive(Scheduler(), {0: [a], 2: [b]})  # b arrives once a's prompt is in the cache
    assert model.stats.prompt_tokens_reused - before >= shared
    assert collected(b).tokens == alone(model, second, 12)
    assert collected(a).tokens == alone(model, first, 12)


def test_admission_waits_for_kv_room_and_never_evicts_a_running_sequence(
    tiny_gguf_repo: Path,
) -> None:
    """A cache of 256 cells: two 120-token reservations fit, a third waits until one ends; the
    running ones are never evicted (only an idle slot's saved prefix may be)."""
    small = load(tiny_gguf_repo, max_batch=8, kv_tokens=256)
    try:
        prompts = [small.tokenize(t) for t in TEXTS[:3]]
        sequences = [sequence(small, p, 120 - len(p), GREEDY) for p in prompts]
        scheduler = Scheduler()
        for seq in sequences:
            scheduler.add(seq)
        step(scheduler)
        load_now = scheduler.load_of(small)
        assert (load_now.running, load_now.waiting) == (2, 1)
        evaluated = small.stats.tokens_evaluated
        while scheduler.has_work:
            step(scheduler)
        # every token evaluated once (nothing re-evaluated after an eviction): each sampled
        # token but the last of each sequence, and the third prompt once a place was free
        produced = sum(len(collected(s).tokens) for s in sequences)
        assert small.stats.tokens_evaluated - evaluated == produced - 3 + len(prompts[2])
        assert all(collected(s).error is None for s in sequences)
    finally:
        small.unload()
