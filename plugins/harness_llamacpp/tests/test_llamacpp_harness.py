"""The llama.cpp harness through its protocol: real GGUF files (written by the tiny_gguf fixture),
real llama.cpp, compared against llama-cpp-python's own ``Llama`` and the transformers tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from cortex_harness_llamacpp.harness import LlamaCppHarness
from cortex_harness_llamacpp.model import LlamaCppModel

from cortex.devices import Device, cpu_device
from cortex.harness import (
    DeviceOutOfMemory,
    Generation,
    HarnessError,
    LoadedModel,
    LoadOptions,
    PromptError,
    SamplingParams,
)

pytest.importorskip("llama_cpp")

GREEDY = SamplingParams(temperature=0.0)
# Flash attention sums over KV cells in cell order, and cell order depends on what else ran
# (prefix reuse, evictions, other streams): near-tie greedy tokens can then flip. Without it the
# output is exactly reproducible, which is what these tests compare. Parity tests set it per case.
DEFAULTS = {"n_threads": 1, "flash_attn": "off"}


def load(repo: Path, quant: str | None = "F16", **extra: object) -> LlamaCppModel:
    context = extra.pop("context_length", None)
    capacity = {k: extra.pop(k) for k in ("max_batch", "kv_tokens") if k in extra}
    options = LoadOptions(
        quant=quant, context_length=context, extra={**DEFAULTS, **extra}, **capacity
    )
    model = LlamaCppHarness().load(repo, cpu_device(), options)
    assert isinstance(model, LlamaCppModel)
    return model


def run(model: LoadedModel, prompt: list[int], n: int, sampling: SamplingParams = GREEDY) -> list:
    generation = model.start(prompt, sampling)
    try:
        return [generation.step().token_id for _ in range(n)]
    finally:
        generation.close()


def reference_greedy(path: Path, prompt: list[int], n: int, flash_attn: bool) -> list[int]:
    """What llama-cpp-python's high-level API generates for the same file and prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, flash_attn=flash_attn, verbose=False)
    try:
        return list(itertools.islice(llm.generate(prompt, temp=0.0), n))
    finally:
        llm.close()


@pytest.fixture
def model(tiny_gguf_repo: Path):
    loaded = load(tiny_gguf_repo)
    yield loaded
    loaded.unload()


# ---- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["F16", "f16", "F32", "f32"])
def test_load_picks_the_quant_case_insensitively(tiny_gguf_repo: Path, quant: str) -> None:
    loaded = load(tiny_gguf_repo, quant)
    try:
        assert loaded.path.name == f"tiny-{quant.upper()}.gguf"
        assert isinstance(loaded, LoadedModel)
    finally:
        loaded.unload()


def test_load_with_an_unknown_quant_names_the_files(tiny_gguf_repo: Path) -> None:
    with pytest.raises(HarnessError, match=r"Q4_K_M.*tiny-F16\.gguf.*tiny-F32\.gguf"):
        load(tiny_gguf_repo, "Q4_K_M")


def test_load_without_a_quant_is_ambiguous_with_two_files(tiny_gguf_repo: Path) -> None:
    with pytest.raises(HarnessError, match="2 GGUF files match"):
        load(tiny_gguf_repo, None)


def test_load_without_a_quant_takes_the_only_file(tiny_gguf_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "only.gguf").symlink_to(tiny_gguf_repo / "tiny-F32.gguf")
    loaded = load(tmp_path, None)
    try:
        assert loaded.path.name == "only.gguf"
    finally:
        loaded.unload()


def test_a_corrupt_file_fails_with_llama_cpps_reason(tmp_path: Path) -> None:
    (tmp_path / "bad-F16.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(HarnessError, match=r"could not load bad-F16\.gguf onto cpu: .+"):
        load(tmp_path, "F16")


def test_a_context_that_cannot_fit_the_device_is_refused_before_allocating(
    tiny_gguf_repo: Path,
) -> None:
    small = Device("cpu", 0, "cpu", total_memory=64 * 2**20, free_memory=64 * 2**20)
    options = LoadOptions(quant="F16", context_length=1_000_000, extra=DEFAULTS)
    with pytest.raises(DeviceOutOfMemory, match=r"KV cache of 1000192 tokens needs 2\d\d MiB"):
        LlamaCppHarness().load(tiny_gguf_repo, small, options)


def test_cuda_device_needs_a_gpu_build(tiny_gguf_repo: Path) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp has GPU offload")
    gpu = Device("cuda", 0, "fake", 24 * 2**30, 24 * 2**30)
    with pytest.raises(HarnessError, match="GGML_CUDA=on"):
        LlamaCppHarness().load(tiny_gguf_repo, gpu, LoadOptions(quant="F16"))


def test_context_defaults_to_the_gguf_metadata_capped_by_config(tiny_gguf_repo: Path) -> None:
    trained = load(tiny_gguf_repo)
    capped = load(tiny_gguf_repo, max_context=64)
    chosen = load(tiny_gguf_repo, context_length=100)
    try:
        assert trained.context_length == 256  # llama.context_length in the file
        assert capped.context_length == 64
        assert chosen.context_length == 100
    finally:
        for m in (trained, capped, chosen):
            m.unload()


def test_bad_option_values_are_harness_errors(tiny_gguf_repo: Path) -> None:
    with pytest.raises(HarnessError, match="n_threads"):
        load(tiny_gguf_repo, n_threads="many")
    with pytest.raises(HarnessError, match=r"parallel .* is replaced by max_batch"):
        load(tiny_gguf_repo, parallel=2)
    with pytest.raises(HarnessError, match="flash_attn must be one of auto, on, off"):
        load(tiny_gguf_repo, flash_attn="sometimes")


# ---- parity ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q8_repo(tiny_gguf_repo: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny repo plus a Q8_0 file (a real block quantisation, not just a float type)."""
    from cortex.testing.tiny_gguf import write_gguf

    repo = tmp_path_factory.mktemp("q8")
    for f in tiny_gguf_repo.iterdir():
        (repo / f.name).symlink_to(f)
    write_gguf(tiny_llama_dir, repo / "tiny-Q8_0.gguf", "Q8_0")
    return repo


@pytest.mark.parametrize("flash_attn", ["off", "on"])
@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0"])
def test_greedy_matches_llama_cpp_python_token_for_token(
    q8_repo: Path, quant: str, flash_attn: str
) -> None:
    loaded = load(q8_repo, quant, flash_attn=flash_attn)
    try:
        prompt = loaded.render_chat([{"role": "user", "content": "the quick dog sings today"}])
        ours = run(loaded, prompt, 32)
    finally:
        loaded.unload()
    path = q8_repo / f"tiny-{quant}.gguf"
    assert ours == reference_greedy(path, prompt, 32, flash_attn=flash_attn == "on")


def test_chat_template_and_tokenizer_match_transformers(
    model: LlamaCppModel, tiny_llama_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    messages = [
        {"role": "system", "content": "You are a small model."},
        {"role": "user", "content": "café naïve 東京 🙂 hello"},
    ]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert model.render_chat(messages) == tokenizer.encode(expected, add_special_tokens=False)
    text = "The quick brown dog über 日本語 🚀 <|im_end|>"
    assert model.tokenize(text) == tokenizer.encode(text)
    assert model.decode(tokenizer.encode("crème brûlée")) == "crème brûlée"


def test_chat_template_renders_tools(model: LlamaCppModel) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    ids = model.render_chat([{"role": "user", "content": "weather?"}], tools=tools)
    assert "get_weather" in model.decode(ids)


def test_content_parts_are_flattened(model: LlamaCppModel) -> None:
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    assert model.render_chat([{"role": "user", "content": parts}]) == model.render_chat(
        [{"role": "user", "content": "hello world"}]
    )


def test_decode_holds_a_cut_character_as_replacement(model: LlamaCppModel) -> None:
    ids = model.tokenize("🙂")
    assert len(ids) > 1  # byte-level pieces
    assert model.decode(ids[:-1]).endswith("\ufffd")
    assert model.decode(ids) == "🙂"


def test_control_tokens_decode_to_nothing(model: LlamaCppModel) -> None:
    eos = model.tokenize("<|im_end|>")
    assert len(eos) == 1
    assert model.decode(eos) == ""


# ---- generation --------------------------------------------------------------------------------


def test_steps_are_one_token_each_and_generations_are_protocol_objects(
    model: LlamaCppModel,
) -> None:
    generation = model.start(model.tokenize("the cat"), GREEDY)
    assert isinstance(generation, Generation)
    step = generation.step()
    assert isinstance(step.token_id, int) and step.is_eos is False
    generation.close()
    generation.close()  # idempotent
    with pytest.raises(HarnessError, match="closed"):
        generation.step()


def interleave(model: LlamaCppModel, prompts: list, n: int, sampling=GREEDY) -> list[list[int]]:
    """Step every generation once per round through ``step()`` (each alone)."""
    generations = [model.start(p, sampling) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(n):
        for out, generation in zip(outputs, generations, strict=True):
            out.append(generation.step().token_id)
    for generation in generations:
        generation.close()
    return outputs


def test_generations_stepped_in_turns_equal_solo_runs(model: LlamaCppModel) -> None:
    texts = ("the cat runs", "a red bird sings", "the cat walks")
    prompts = [model.tokenize(t) for t in texts]
    solo = [run(model, p, 20) for p in prompts]
    assert interleave(model, prompts, 20) == solo
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [run(model, p, 12, seeded) for p in prompts]
    assert interleave(model, prompts, 12, seeded) == alone


def test_prefix_reuse_skips_the_shared_prompt(model: LlamaCppModel) -> None:
    conversation = [{"role": "user", "content": "the small cat reads a book near the window"}]
    first = model.render_chat(conversation)
    reply = run(model, first, 8)
    follow_up = model.render_chat(
        [
            *conversation,
            {"role": "assistant", "content": model.decode(reply)},
            {"role": "user", "content": "and then?"},
        ]
    )
    before = model.stats.prompt_tokens_reused
    second = run(model, follow_up, 8)
    reused = model.stats.prompt_tokens_reused - before
    assert reused >= len(first) - 1
    # Reusing the cache must not change the result.
    model.reset()
    assert run(model, follow_up, 8) == second
    assert model.stats.prompt_tokens_reused - before == reused  # reset dropped the cache


def test_prefix_cache_can_be_disabled(tiny_gguf_repo: Path) -> None:
    loaded = load(tiny_gguf_repo, prefix_cache=False)
    try:
        prompt = loaded.tokenize("the cat runs")
        run(loaded, prompt, 4)
        run(loaded, prompt, 4)
        assert loaded.stats.prompt_tokens_reused == 0
    finally:
        loaded.unload()


def test_seeded_sampling_is_reproducible_and_seed_dependent(model: LlamaCppModel) -> None:
    prompt = model.tokenize("the cat runs and the dog walks")
    sampled = [run(model, prompt, 16, SamplingParams(temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_top_k_one_is_greedy(model: LlamaCppModel) -> None:
    prompt = model.tokenize("a blue fish")
    assert run(model, prompt, 16, SamplingParams(temperature=0.9, top_k=1, seed=3)) == run(
        model, prompt, 16
    )


def test_presence_penalty_stops_repeats(model: LlamaCppModel) -> None:
    prompt = model.tokenize("the cat runs and the dog walks")
    plain = run(model, prompt, 30)
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    penalised = run(model, prompt, 30, SamplingParams(temperature=0.0, presence_penalty=50.0))
    assert len(set(penalised)) == len(penalised)


def test_repetition_penalty_also_counts_the_prompt(model: LlamaCppModel) -> None:
    prompt = model.tokenize("the cat runs and the dog walks")
    penalised = run(model, prompt, 20, SamplingParams(temperature=0.0, repetition_penalty=50.0))
    assert not set(penalised) & set(prompt)
    assert penalised != run(model, prompt, 20)


def test_prompt_errors_are_the_clients_fault(model: LlamaCppModel) -> None:
    with pytest.raises(PromptError, match="empty"):
        model.start([], GREEDY)
    with pytest.raises(PromptError, match="context is 256"):
        model.start([5] * 256, GREEDY)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.start([5, 10_000], GREEDY)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.decode([5, -1])
    with pytest.raises(PromptError, match="chat template failed"):
        model.render_chat([{"role": "user"}])  # no content: the template cannot concatenate
    # The model is still fine afterwards.
    assert len(run(model, model.tokenize("the cat"), 3)) == 3


def test_generation_stops_at_the_context_length(tiny_gguf_repo: Path) -> None:
    loaded = load(tiny_gguf_repo, context_length=20)
    try:
        prompt = loaded.tokenize("the cat runs")
        generation = loaded.start(prompt, GREEDY)
        steps = 0
        with pytest.raises(HarnessError, match="context of 20 tokens is full"):
            while True:
                generation.step()
                steps += 1
        assert steps == 20 - len(prompt)  # prompt + completion fill the context
        generation.close()
    finally:
        loaded.unload()


# ---- memory ------------------------------------------------------------------------------------


def test_memory_counts_weights_and_kv_cache_and_unload_frees_it(tiny_gguf_repo: Path) -> None:
    small = load(tiny_gguf_repo, "F32", context_length=256, kv_tokens=256)
    large = load(tiny_gguf_repo, "F32", context_length=256, kv_tokens=4096)
    try:
        file_size = (tiny_gguf_repo / "tiny-F32.gguf").stat().st_size
        # 2 layers x 2 KV heads x (16 + 16) dims x 2 bytes = 256 bytes per cached token
        assert large.memory_bytes() - small.memory_bytes() == (4096 - 256) * 256
        assert 0.5 * file_size < small.memory_bytes() < file_size + 256 * 256 + 65536
        generation = large.start(large.tokenize("the cat"), GREEDY)
        generation.step()
        large.unload()
        assert large.memory_bytes() == 0
        with pytest.raises(HarnessError, match="closed"):
            generation.step()
        with pytest.raises(HarnessError, match="unloaded"):
            large.tokenize("x")
        large.unload()  # idempotent
    finally:
        small.unload()
        large.unload()


# ---- CUDA (skipped without a GPU and a CUDA build of llama.cpp) ---------------------------------


@pytest.mark.gpu
def test_cuda_offload_matches_cpu_greedy(tiny_gguf_repo: Path) -> None:
    import llama_cpp

    from cortex.devices import cuda_devices

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("llama.cpp was built without GPU offload")
    gpu = cuda_devices()[0]
    on_gpu = LlamaCppHarness().load(tiny_gguf_repo, gpu, LoadOptions(quant="F32"))
    on_cpu = load(tiny_gguf_repo, "F32")
    try:
        prompt = on_cpu.tokenize("the quick dog sings today")
        assert run(on_gpu, prompt, 16) == run(on_cpu, prompt, 16)
        assert on_gpu.memory_bytes() > 0
    finally:
        on_gpu.unload()
        on_cpu.unload()


def test_logprobs_are_log_softmax_of_llama_cpps_logits(tiny_gguf_repo: Path) -> None:
    """Each step's log-probabilities (asked for with SamplingParams.logprobs) equal a
    log_softmax of the logits llama-cpp-python's own Llama computes for the same tokens."""
    import llama_cpp
    import numpy as np

    loaded = load(tiny_gguf_repo, "F32")
    try:
        prompt = loaded.tokenize("the cat runs and the dog walks")
        generation = loaded.start(prompt, SamplingParams(temperature=0.0, logprobs=3))
        steps = [generation.step() for _ in range(8)]
        generation.close()
        llm = llama_cpp.Llama(
            str(tiny_gguf_repo / "tiny-F32.gguf"),
            n_ctx=256,
            n_threads=1,
            logits_all=True,
            flash_attn=False,
            verbose=False,
        )
        try:
            llm.eval(prompt + [s.token_id for s in steps[:-1]])
            scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
        finally:
            llm.close()
        for i, step in enumerate(steps):
            row = scores[len(prompt) - 1 + i]
            log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            assert step.logprob == pytest.approx(log_probs[step.token_id], abs=1e-3)
            assert [t for t, _ in step.top_logprobs] == list(np.argsort(-log_probs)[:3])
            assert step.top_logprobs[0][0] == step.token_id  # greedy took the most likely
        plain = loaded.start(prompt, SamplingParams(temperature=0.0))
        assert plain.step().logprob is None  # not asked for: not computed
        plain.close()
    finally:
        loaded.unload()
