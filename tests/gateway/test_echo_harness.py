"""The echo harness through the harness protocol (the neuron drives it the same way)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cortex.builtins.echo import EOS_ID, EchoHarness, write_echo_repo
from cortex.devices import cpu_device
from cortex.harness import Generation, Harness, HarnessError, LoadedModel, LoadOptions
from cortex.harness import SamplingParams as Sampling
from cortex.plugins import PluginRegistry
from cortex.source import Preflight, RepoFile, WeightFormat


def preflight(*files: str) -> Preflight:
    return Preflight(
        "huggingface:t/echo", "0" * 40, WeightFormat.NONE, tuple(RepoFile(f, 10) for f in files)
    )


def load(tmp_path: Path, **spec: object) -> LoadedModel:
    write_echo_repo(tmp_path, **spec)
    return EchoHarness().load(tmp_path, cpu_device(), LoadOptions())


def run(model: LoadedModel, prompt: list[int], limit: int = 1000) -> list[int]:
    gen = model.start(prompt, Sampling(temperature=0))
    assert isinstance(gen, Generation)
    out = []
    for _ in range(limit):
        step = gen.step()
        if step.is_eos:
            assert step.token_id == EOS_ID
            break
        out.append(step.token_id)
    gen.close()
    return out


def test_registered_as_builtin_and_accepts_only_echo_repos() -> None:
    harnesses = {h.name: h for h in PluginRegistry(allowed=set()).harnesses()}
    echo = harnesses["echo"]
    assert isinstance(echo, Harness)
    assert echo.accepts(preflight("echo.json", "README.md"))
    assert not echo.accepts(preflight("config.json", "model.safetensors"))
    assert echo.files_needed(preflight("echo.json", "README.md")) == ["echo.json"]
    assert echo.estimate_memory(preflight("echo.json"), LoadOptions()) > 0


def test_fixed_reply_streams_word_tokens_then_eos(tmp_path: Path) -> None:
    model = load(tmp_path, reply="Hello there, world!", memory_mb=12, context_length=512)
    assert isinstance(model, LoadedModel)
    assert model.memory_bytes() == 12 * 2**20
    assert model.context_length == 512
    prompt = model.render_chat([{"role": "user", "content": "hi"}])
    tokens = run(model, prompt)
    assert len(tokens) == 3
    assert model.decode(tokens) == "Hello there, world!"
    assert [model.decode(tokens[: i + 1]) for i in range(3)] == [
        "Hello",
        "Hello there,",
        "Hello there, world!",
    ]


def test_null_reply_repeats_the_last_user_message(tmp_path: Path) -> None:
    model = load(tmp_path, reply=None)
    prompt = model.render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "second  question\n ok"}]},
        ]
    )
    assert model.decode(run(model, prompt)) == "second  question\n ok"


def test_completion_prompt_is_repeated(tmp_path: Path) -> None:
    model = load(tmp_path, reply=None)
    text = " the quick  brown fox\n"
    ids = model.tokenize(text)
    assert model.decode(ids) == text
    assert model.decode(run(model, ids)) == text


def test_tool_calls_only_when_tools_offered_and_user_spoke_last(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        reply="It is sunny.",
        reasoning="need weather",
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    user = [{"role": "user", "content": "weather?"}]
    text = model.decode(run(model, model.render_chat(user, tools)))
    assert text.startswith("<think>need weather</think><tool_call>")
    call = json.loads(text.split("<tool_call>")[1].split("</tool_call>")[0])
    assert call == {"name": "get_weather", "arguments": {"city": "Paris"}}
    after_tool = [*user, {"role": "tool", "content": "sunny"}]
    assert model.decode(run(model, model.render_chat(after_tool, tools))).endswith("It is sunny.")
    assert model.decode(run(model, model.render_chat(user))).endswith("It is sunny.")


def test_tokens_per_second_paces_steps(tmp_path: Path) -> None:
    model = load(tmp_path, reply="a b c d e f g h i j", tokens_per_second=100.0)
    started = time.monotonic()
    assert len(run(model, model.render_chat([]))) == 10
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 1.0


def test_interleaved_generations_share_the_pace(tmp_path: Path) -> None:
    """Two streams stepped alternately on one thread both keep roughly the configured rate."""
    model = load(tmp_path, reply=" ".join("w" for _ in range(10)), tokens_per_second=50.0)
    a = model.start(model.render_chat([]), Sampling())
    b = model.start(model.render_chat([]), Sampling())
    started = time.monotonic()
    while not (a.step().is_eos | b.step().is_eos):
        pass
    assert time.monotonic() - started < 0.4  # 11 steps each at 50/s = 0.22 s, not 0.44 s


def test_invalid_echo_json_is_a_harness_error(tmp_path: Path) -> None:
    (tmp_path / "echo.json").write_text('{"reply": "x", "replyy": 1}')
    with pytest.raises(HarnessError, match="replyy"):
        EchoHarness().load(tmp_path, cpu_device(), LoadOptions())
    with pytest.raises(HarnessError, match="missing"):
        EchoHarness().load(tmp_path / "nope", cpu_device(), LoadOptions())


def test_context_length_option_caps_declared(tmp_path: Path) -> None:
    write_echo_repo(tmp_path, context_length=4096)
    model = EchoHarness().load(tmp_path, cpu_device(), LoadOptions(context_length=256))
    assert model.context_length == 256
