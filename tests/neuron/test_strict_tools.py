"""Tool calls held to their schemas through a real neuron with the official ``openai`` SDK: with
``tool_choice`` ``required`` or a named function a random-weight model answers calls whose
arguments validate against ``strict`` tools' schemas (whole and streamed); with ``auto`` it
may answer text, and a call it starts follows the schema. The grammar itself is checked on the
tiny model's tokenizer: a call that breaks the schema cannot be written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from cortex.harness import ToolCallFormat, ToolSchema
from cortex.testing.registry import RunningRegistry, publish_repo
from cortex.testing.tiny_models import build_tiny_model
from tests.neuron.conftest import LiveNeuron

LLAMA = "huggingface:acme/tiny-llama-1k"
ASK = [{"role": "user", "content": "Weather?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": TIME_PARAMETERS, "strict": True},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}


@pytest.fixture(scope="module")
def loaded(
    neuron: LiveNeuron, model_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> LiveNeuron:
    """The tiny llama with a 1024-token context: the template writes the tools' schemas into
    the prompt, and the tiny tokenizer spends a token on nearly every JSON character."""
    repo = build_tiny_model(tmp_path_factory.mktemp("tiny-1k") / "llama", context_length=1024)
    publish_repo(model_registry.root, "acme/tiny-llama-1k", repo)
    neuron.load("acme/tiny-llama-1k")
    return neuron


def assert_valid_calls(calls: list[Any], names: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_calls_that_follow_the_schemas(loaded: LiveNeuron, seed: int) -> None:
    answer = loaded.openai().chat.completions.create(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=150,
        temperature=1.0,
        seed=seed,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert_valid_calls(choice.message.tool_calls or [], {"get_weather", "get_time"})


def test_a_named_function_is_the_one_called_streamed_too(loaded: LiveNeuron) -> None:
    client = loaded.openai()
    answer = client.chat.completions.create(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=150,
        temperature=1.0,
        seed=5,
    )
    assert_valid_calls(answer.choices[0].message.tool_calls or [], {"get_time"})
    with client.chat.completions.stream(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
        temperature=1.0,
        seed=6,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(final.choices[0].message.tool_calls or [], {"get_weather"})


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_auto_with_strict_tools_answers_text_or_valid_calls(loaded: LiveNeuron, seed: int) -> None:
    answer = loaded.openai().chat.completions.create(
        model=LLAMA,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=1.0,
        seed=seed,
    )
    message = answer.choices[0].message
    assert "<tool_call>" not in (message.content or "")  # never a broken call left as text
    for call in message.tool_calls or []:
        assert_valid_calls([call], {"get_weather", "get_time"})


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": 7}, "strict": True},
                    }
                ]
            },
            "tools",
        ),
    ],
)
def test_tool_choice_mistakes_are_typed_400s(
    loaded: LiveNeuron, extra: dict[str, Any], param: str
) -> None:
    body = {"model": LLAMA, "messages": ASK, "max_tokens": 5, "tools": TOOLS, **extra}
    answer = httpx.post(f"{loaded.url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def _accepts(tiny_llama_dir: Path, grammar: str, text: str) -> bool:
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    matcher = llguidance.LLMatcher(
        llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer)),
        llguidance.LLMatcher.grammar_from_lark(grammar),
    )
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


def test_the_grammar_holds_a_started_call_to_its_schema(tiny_llama_dir: Path) -> None:
    from cortex.tool_grammar import tool_call_grammar

    fmt = ToolCallFormat((ToolSchema("get_time", json.dumps(TIME_PARAMETERS)),))
    auto = tool_call_grammar(fmt, "hermes", None)
    good = '<tool_call>\n{"name":"get_time","arguments":{"zone":2}}\n</tool_call>'
    assert _accepts(tiny_llama_dir, auto, "It is sunny, no call needed.")
    assert _accepts(tiny_llama_dir, auto, good)
    assert _accepts(tiny_llama_dir, auto, "Let me look. " + good)
    assert not _accepts(
        tiny_llama_dir, auto, '<tool_call>\n{"name":"get_time","arguments":{"zone":99}}'
    )
    assert not _accepts(tiny_llama_dir, auto, '<tool_call>\n{"name":"other"')
    assert not _accepts(tiny_llama_dir, auto, "text <tool_call> more text")
    required = tool_call_grammar(attrs_evolve_required(fmt), "hermes", None)
    assert not _accepts(tiny_llama_dir, required, "Sure")
    assert _accepts(tiny_llama_dir, required, good)
    llama3 = tool_call_grammar(fmt, "llama3_json", None)
    assert _accepts(tiny_llama_dir, llama3, '{"name":"get_time","parameters":{"zone":-3}}')
    assert not _accepts(tiny_llama_dir, llama3, '{"name":"get_time","arguments":{')
    assert _accepts(tiny_llama_dir, llama3, "Plain text.")


def attrs_evolve_required(fmt: ToolCallFormat) -> ToolCallFormat:
    import attrs

    return attrs.evolve(fmt, required=True)
