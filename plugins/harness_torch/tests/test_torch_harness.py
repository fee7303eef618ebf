"""The torch harness against real tiny transformers models (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cortex_harness_torch.harness import TorchHarness
from cortex_harness_torch.memory import estimate_bytes
from cortex_harness_torch.model import TorchModel

from cortex.devices import cpu_device
from cortex.harness import LoadOptions, PromptError, SamplingParams
from cortex.source import Preflight, RepoFile, WeightFormat


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> TorchModel:
    model = TorchHarness().load(tiny_llama_dir, cpu_device(), LoadOptions())
    assert isinstance(model, TorchModel)
    return model


def _generate_reference(model: TorchModel, prompt: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    out = model.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def _run(model: TorchModel, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    generation = model.start(prompt, params)
    try:
        return [generation.step().token_id for _ in range(n)]
    finally:
        generation.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_steps_match_transformers_generate(
    arch: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    directory = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    model = TorchHarness().load(directory, cpu_device(), LoadOptions())
    for text in ("hello the cat", "a long story about the river and the mountain city"):
        prompt = model.render_chat([{"role": "user", "content": text}])
        ours = _run(model, prompt, SamplingParams(temperature=0), 40)
        assert ours == _generate_reference(model, prompt, 40)
    model.unload()


def test_seeded_sampling_is_reproducible_and_seed_dependent(llama: TorchModel) -> None:
    prompt = llama.tokenize("the quick dog")
    params = SamplingParams(
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        seed=7,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.2,
    )
    first = _run(llama, prompt, params, 20)
    assert first == _run(llama, prompt, params, 20)
    other = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=8)
    assert first != _run(llama, prompt, other, 20)


def test_top_k_one_is_greedy(llama: TorchModel) -> None:
    prompt = llama.tokenize("a red bird")
    greedy = _run(llama, prompt, SamplingParams(temperature=0), 15)
    assert _run(llama, prompt, SamplingParams(temperature=1.5, top_k=1, seed=1), 15) == greedy


def test_chat_template_renders_tools_and_fallback(llama: TorchModel, tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = llama.decode(llama.render_chat(messages, tools))
    assert "get_weather" in text and '{"city": "Paris"}' in text and "sunny" in text

    # a tokenizer without a chat template gets the documented ChatML fallback
    tokenizer = llama.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        ids = llama.render_chat([{"role": "user", "content": "hello"}], tools)
        rendered = tokenizer.decode(ids)
        assert rendered.endswith("<|im_start|>assistant\n")
        assert "get_weather" in rendered
    finally:
        tokenizer.chat_template = saved

    with pytest.raises(PromptError):
        llama.render_chat([{"role": "user", "content": [{"type": "image_url"}]}])


def test_estimate_uses_config_and_target_dtype(tiny_llama_dir: Path) -> None:
    import json

    size = (tiny_llama_dir / "model.safetensors").stat().st_size
    preflight = Preflight(
        model_id="huggingface:t/tiny",
        revision="0" * 40,
        weight_format=WeightFormat.SAFETENSORS,
        files=(RepoFile("config.json", 700), RepoFile("model.safetensors", size)),
    )
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    harness = TorchHarness()
    cpu = harness.estimate_memory(
        preflight, LoadOptions(device_kind="cpu", extra={"config": config})
    )
    cuda = harness.estimate_memory(
        preflight, LoadOptions(device_kind="cuda", extra={"config": config})
    )
    assert cpu >= size  # float32 stored, float32 on CPU
    # KV per token: 2 (k, v) x 2 layers x 2 kv heads x 16 dims x 4 bytes; the capacity counts:
    # kv_tokens positions for running generations, plus saved prefixes (a quarter of them, at
    # least one context)
    per_token = 2 * 2 * 2 * 16 * 4
    one = estimate_bytes(size, config, "cpu", 256, max_batch=1, kv_tokens=256)
    many = estimate_bytes(size, config, "cpu", 256, max_batch=8, kv_tokens=4096)
    assert many - one == per_token * ((4096 + 1024) - (256 + 256))
    # the default capacity: 32 x 1024 positions, at most 32 contexts of 256
    default = estimate_bytes(size, config, "cpu", 256)
    assert default - one == per_token * ((32 * 256 + 32 * 256 // 4) - (256 + 256))
    assert cuda - 64 * 2**20 < cpu  # half precision weights on CUDA
    model = harness.load(tiny_llama_dir, cpu_device(), LoadOptions())
    assert model.memory_bytes() <= cpu
    model.unload()
    assert model.memory_bytes() == 0


def test_bad_snapshot_is_a_harness_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from cortex.harness import HarnessError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HarnessError):
        TorchHarness().load(broken, cpu_device(), LoadOptions())
    with pytest.raises(HarnessError):
        TorchHarness().load(tmp_path, cpu_device(), LoadOptions())


def test_cpu_threads_leave_a_core_for_the_event_loop() -> None:
    import os

    from cortex_harness_torch.harness import cpu_threads

    assert cpu_threads({"CORTEX_TORCH_CPU_THREADS": "3"}) == 3
    expected = max(1, len(os.sched_getaffinity(0)) - 1)
    assert cpu_threads({}) == expected
    assert cpu_threads({"CORTEX_TORCH_CPU_THREADS": "lots"}) == expected
