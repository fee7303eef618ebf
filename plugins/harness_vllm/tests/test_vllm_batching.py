"""The vLLM harness driven by the neuron's real scheduler on this thread: one engine step per
iteration for every running generation, generations joining and leaving at different
iterations; each must give, token for token, what vLLM's own ``LLM.generate`` gives for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cortex_harness_vllm.harness import VllmHarness
from cortex_harness_vllm.model import VllmModel

from cortex.devices import cpu_device
from cortex.harness import HarnessError, LoadOptions, SamplingParams, is_batched
from cortex.neuron.scheduler import Scheduler
from cortex.testing.batching import TEXTS, collected, drive, sequence, step

GREEDY = SamplingParams(temperature=0.0)
MAX_TOKENS = [40, 24, 40, 7, 40, 33, 40, 12]


@pytest.fixture(scope="module")
def model(tiny_vllm_dir: Path):
    loaded = VllmHarness().load(
        tiny_vllm_dir, cpu_device(), LoadOptions(max_batch=6, kv_tokens=2048)
    )
    assert isinstance(loaded, VllmModel) and is_batched(loaded)
    yield loaded
    loaded.unload()


@pytest.fixture(scope="module")
def reference(tiny_vllm_dir: Path, model: VllmModel):
    """vLLM's own LLM.generate on the same files, greedy, for whole lists of prompts."""
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    llm = LLM(
        model=str(tiny_vllm_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=model.context_length,
        kv_cache_memory_bytes=16 * 2**20,
        seed=0,
    )

    def generate(prompts: list[list[int]], n: int, **sampling: object) -> list[list[int]]:
        params = VllmSamplingParams(
            max_tokens=n, ignore_eos=True, **{"temperature": 0.0, **sampling}
        )
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    yield generate
    llm.llm_engine.engine_core.shutdown()


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def test_capacity_comes_from_vllms_own_block_count(model: VllmModel) -> None:
    assert model.max_batch == 6
    assert model.kv_tokens == (model.num_blocks - model.max_batch) * model.block_size
    # the plan asked for 2048 positions and a spare block per sequence: vLLM made as many
    assert model.kv_tokens >= 2048
    assert model.eos_ids  # from the generation config and the tokenizer


def test_streams_joining_and_leaving_match_llm_generate(model: VllmModel, reference) -> None:
    prompts = [model.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
    expected = reference(prompts, max(MAX_TOKENS))
    sequences = [sequence(model, p, n, GREEDY) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    steps = model.steps
    # a small token budget (vLLM chunks prefills itself; the budget only picks the rows asked
    # about); six rows at most, so two of the eight wait for a running one to leave
    iterations = drive(
        Scheduler(max_batch_tokens=24),
        {0: sequences[:3], 2: sequences[3:5], 5: sequences[5:7], 9: sequences[7:]},
    )
    for seq, want, n in zip(sequences, expected, MAX_TOKENS, strict=True):
        sink = collected(seq)
        assert sink.error is None
        assert sink.tokens == until_eos(want[:n], model.eos_ids)
        assert sink.finish in ("length", "stop")
    # one engine step per iteration for all rows
    assert model.steps - steps == iterations
    assert not model._running


def test_a_row_not_asked_about_keeps_its_token_for_later(model: VllmModel, reference) -> None:
    """A budget of 1: the scheduler asks about one prefilling row an iteration, but vLLM
    prefills all of them in one step; the others' first tokens wait for their rows."""
    prompts = [model.tokenize(t) for t in TEXTS[:4]]
    expected = reference(prompts, 10)
    sequences = [sequence(model, p, 10, GREEDY) for p in prompts]
    drive(Scheduler(max_batch_tokens=1), {0: sequences})
    assert [collected(s).tokens for s in sequences] == [
        until_eos(e, model.eos_ids) for e in expected
    ]


def test_pending_tokens_is_the_prompt_until_the_first_token(model: VllmModel) -> None:
    prompt = model.tokenize(TEXTS[1])
    generation = model.start(prompt, GREEDY)
    assert generation.pending_tokens == len(prompt)
    model.admit(generation)
    assert generation.pending_tokens == len(prompt)
    first = model.step_batch([(generation, len(prompt))])[0]
    assert first is not None  # the prompt is short: vLLM prefills it in one step
    assert generation.pending_tokens == 1
    generation.close()
    assert not model._running


def test_a_cancelled_sequence_is_aborted_in_vllm_at_once(model: VllmModel, reference) -> None:
    prompts = [model.tokenize(t) for t in TEXTS[:3]]
    sequences = [sequence(model, p, 40, GREEDY) for p in prompts]
    scheduler = Scheduler()
    for seq in sequences:
        scheduler.add(seq)
    for _ in range(4):
        step(scheduler)
    assert len(model._running) == 3
    sequences[1].cancelled = True
    step(scheduler)
    assert len(model._running) == 2
    assert scheduler.load_of(model).running == 2
    engine = model._engine.engine_core.engine_core
    assert len(engine.scheduler.requests) == 2  # vLLM let go of the aborted request
    while scheduler.has_work:
        step(scheduler)
    expected = reference([prompts[0], prompts[2]], 40)
    assert collected(sequences[0]).tokens == until_eos(expected[0], model.eos_ids)
    assert collected(sequences[2]).tokens == until_eos(expected[1], model.eos_ids)


def test_seeded_sampling_in_a_batch_equals_sampling_alone(model: VllmModel) -> None:
    prompts = [model.tokenize(t) for t in TEXTS[:3]]
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(temperature=1.2, top_k=20, seed=11, presence_penalty=0.5),
        SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.3, frequency_penalty=0.4),
    ]

    def alone(prompt: list[int], sampling: SamplingParams) -> list[int]:
        seq = sequence(model, prompt, 16, sampling)
        drive(Scheduler(), {0: [seq]})
        return collected(seq).tokens

    expected = [alone(p, s) for p, s in zip(prompts, params, strict=True)]
    sequences = [sequence(model, p, 16, s) for p, s in zip(prompts, params, strict=True)]
    drive(Scheduler(), {0: sequences})
    assert [collected(s).tokens for s in sequences] == expected
    # and a seed decides: another seed gives another continuation
    other = alone(prompts[0], SamplingParams(temperature=0.9, top_p=0.9, seed=8))
    assert other != expected[0]


def test_admission_waits_for_kv_room(tiny_vllm_dir: Path) -> None:
    """The cache of one context (256 positions, two blocks of 128 on CPU, plus one spare per
    sequence): two 120-token reservations fit, a third waits until one ends; vLLM never has to
    preempt."""
    small = VllmHarness().load(tiny_vllm_dir, cpu_device(), LoadOptions(max_batch=2, kv_tokens=256))
    try:
        assert small.kv_tokens == 256
        prompts = [small.tokenize(t) for t in TEXTS[:3]]
        sequences = [sequence(small, p, 120 - len(p), GREEDY) for p in prompts]
        scheduler = Scheduler()
        for seq in sequences:
            scheduler.add(seq)
        step(scheduler)
        load_now = scheduler.load_of(small)
        assert (load_now.running, load_now.waiting) == (2, 1)
        while scheduler.has_work:
            step(scheduler)
        assert all(collected(s).error is None for s in sequences)
        stats = small._engine.engine_core.engine_core.scheduler
        assert not stats.requests
    finally:
        small.unload()


def test_an_unloaded_model_refuses_work(tiny_vllm_dir: Path) -> None:
    loaded = VllmHarness().load(tiny_vllm_dir, cpu_device(), LoadOptions(max_batch=2))
    generation = loaded.start(loaded.tokenize("the cat"), GREEDY)
    loaded.admit(generation)
    loaded.unload()
    assert loaded.memory_bytes() == 0
    with pytest.raises(HarnessError, match="unloaded"):
        loaded.tokenize("x")
    loaded.unload()  # twice is fine
