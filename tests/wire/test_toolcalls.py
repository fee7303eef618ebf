"""The incremental output parser: every split of a delta stream gives the same result."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.wire.toolcalls import (
    ContentDelta,
    OutputParser,
    ParsedOutput,
    ReasoningDelta,
    ToolCall,
    collect,
    new_tool_call_id,
    parse_output,
    prompt_opens_reasoning,
)


def fixed_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(index: int, name: str, arguments: dict) -> ToolCall:
    return ToolCall(index, f"call_{index}", name, json.dumps(arguments))


CASES: list[tuple[str, str, ParsedOutput]] = [
    ("plain", "Hello world", ParsedOutput("Hello world", "", ())),
    (
        "think",
        "<think>2+2, carry nothing</think>\n\nThe answer is 4.",
        ParsedOutput("The answer is 4.", "2+2, carry nothing", ()),
    ),
    (
        "hermes after text",
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        ParsedOutput("Let me check.", "", (call(0, "get_weather", {"city": "Paris"}),)),
    ),
    (
        "hermes twice",
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"x": [1, "]"]}}</tool_call>',
        ParsedOutput("", "", (call(0, "a", {}), call(1, "b", {"x": [1, "]"]}))),
    ),
    (
        "qwen3 think then call",
        '<think>need weather</think>\n\n<tool_call>\n{"name": "w", "arguments": {"c": "Oslo"}}'
        "\n</tool_call>",
        ParsedOutput("", "need weather", (call(0, "w", {"c": "Oslo"}),)),
    ),
    (
        "hermes unparseable",
        "<tool_call>{not json}</tool_call> after",
        ParsedOutput("<tool_call>{not json}</tool_call> after", "", ()),
    ),
    (
        "hermes without name",
        '<tool_call>{"arguments": {}}</tool_call>',
        ParsedOutput('<tool_call>{"arguments": {}}</tool_call>', "", ()),
    ),
    (
        "hermes unclosed but complete",
        '<tool_call>{"name": "f", "arguments": {"a": 1}}',
        ParsedOutput("", "", (call(0, "f", {"a": 1}),)),
    ),
    (
        "hermes unclosed and cut",
        '<tool_call>{"name": "f", "argu',
        ParsedOutput('<tool_call>{"name": "f", "argu', "", ()),
    ),
    (
        "llama3 bare json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ParsedOutput("", "", (call(0, "get_weather", {"city": "Paris"}),)),
    ),
    (
        "llama3 bare json then text",
        '{"name": "f", "parameters": {}} then text',
        ParsedOutput("then text", "", (call(0, "f", {}),)),
    ),
    (
        "llama3 python_tag two calls",
        '<|python_tag|>{"name": "f", "parameters": {"q": "a;b"}}; {"name": "g", "parameters": {}}',
        ParsedOutput("", "", (call(0, "f", {"q": "a;b"}), call(1, "g", {}))),
    ),
    (
        "string arguments",
        '<|python_tag|>{"name": "f", "arguments": "{\\"a\\": 2}"}',
        ParsedOutput("", "", (call(0, "f", {"a": 2}),)),
    ),
    (
        "mistral array",
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": "}"}}, {"name": "g", "arguments": {}}]',
        ParsedOutput("", "", (call(0, "f", {"a": "}"}), call(1, "g", {}))),
    ),
    (
        "mistral named",
        '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}',
        ParsedOutput("", "", (call(0, "f", {"a": 1}), call(1, "g", {}))),
    ),
    (
        "mistral unparseable",
        "[TOOL_CALLS]oops",
        ParsedOutput("[TOOL_CALLS]oops", "", ()),
    ),
    ("json content", '{"a": 1} is json', ParsedOutput('{"a": 1} is json', "", ())),
    (
        "hermes tag in prose",
        'Wrap calls in <tool_call> tags, like <tool_call>{"name": "f"}</tool_call>.',
        ParsedOutput("Wrap calls in <tool_call> tags, like .", "", (call(0, "f", {}),)),
    ),
    ("brace prose", "{ braces } start this", ParsedOutput("{ braces } start this", "", ())),
    ("empty object", "{}", ParsedOutput("{}", "", ())),
    ("json content padded", ' {"a": 1}  ', ParsedOutput(' {"a": 1}  ', "", ())),
    (
        "marker lookalikes",
        "x < y and [TOOL not really <think",
        ParsedOutput("x < y and [TOOL not really <think", "", ()),
    ),
    ("unclosed think", "<think>unfinished", ParsedOutput("", "unfinished", ())),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_whole_text(text: str, expected: ParsedOutput) -> None:
    assert parse_output(text, new_id=fixed_ids()) == expected


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_split_position(text: str, expected: ParsedOutput) -> None:
    for i in range(len(text) + 1):
        parser = OutputParser(new_id=fixed_ids())
        events = parser.feed(text[:i]) + parser.feed(text[i:]) + parser.finish()
        assert collect(events) == expected, i


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_character_at_a_time(text: str, expected: ParsedOutput) -> None:
    parser = OutputParser(new_id=fixed_ids())
    events = [event for char in text for event in parser.feed(char)] + parser.finish()
    assert collect(events) == expected


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_splits(data: st.DataObject) -> None:
    _, text, expected = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    parser = OutputParser(new_id=fixed_ids())
    events = []
    for start, end in itertools.pairwise([0, *cuts, len(text)]):
        events += parser.feed(text[start:end])
    assert collect(events + parser.finish()) == expected


def test_markers_are_held_back_until_decided() -> None:
    parser = OutputParser(new_id=fixed_ids())
    assert parser.feed("Hi <tool_") == [ContentDelta("Hi ")]
    assert parser.feed('call>{"name": "f", "arguments": {}}') == []
    assert parser.feed("</tool_call>") == [ToolCall(0, "call_0", "f", "{}")]
    assert parser.finish() == []


def test_reasoning_streams_as_it_arrives() -> None:
    parser = OutputParser()
    assert parser.feed("<think>a") == [ReasoningDelta("a")]
    assert parser.feed("b</th") == [ReasoningDelta("b")]
    assert parser.feed("ink>\n\nDone") == [ContentDelta("Done")]


def test_template_opened_think_in_the_prompt() -> None:
    prompt = "<|im_start|>assistant\n<think>\n"
    assert prompt_opens_reasoning(prompt)
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    assert not prompt_opens_reasoning("<think>x</think>\n")
    parsed = parse_output("planning</think>answer", starts_in_reasoning=True)
    assert parsed == ParsedOutput("answer", "planning", ())


def test_no_tools_means_tool_text_is_content() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_output(text, tools=False) == ParsedOutput(text, "", ())
    assert parse_output('{"name": "f"}', tools=False).content == '{"name": "f"}'


def test_reasoning_off_keeps_think_tags_in_content() -> None:
    assert parse_output("<think>x</think>y", reasoning=False).content == "<think>x</think>y"


def test_openai_shapes_and_finish_reason() -> None:
    parsed = parse_output('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    (tool,) = parsed.tool_calls
    assert tool.id.startswith("call_") and len(tool.id) == 29
    assert tool.openai() == {
        "id": tool.id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1}'},
    }
    assert tool.openai_delta()["index"] == 0
    assert parsed.finish_reason_override == "tool_calls"
    assert parse_output("hi").finish_reason_override is None


def test_ids_are_unique() -> None:
    assert len({new_tool_call_id() for _ in range(100)}) == 100


def test_feed_after_finish_is_an_error() -> None:
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


@pytest.mark.parametrize(
    "prefix,suffix", [("<|python_tag|>", ""), ("<tool_call>", "</tool_call>"), ("", "")]
)
def test_long_tool_call_in_small_deltas_is_linear(prefix: str, suffix: str) -> None:
    """A 20 kB file written through a tool, 4 characters a delta: scanning must not be
    quadratic (it took 15 s before the resumable scanner; about 0.05 s now)."""
    import time

    content = 'def f(x):\n    return x * 2  # "quoted" {braces} [brackets]\n' * 350
    call_json = json.dumps({"name": "write", "arguments": {"path": "a.py", "content": content}})
    text = prefix + call_json + suffix
    parser = OutputParser()
    started = time.perf_counter()
    events = [e for i in range(0, len(text), 4) for e in parser.feed(text[i : i + 4])]
    events += parser.finish()
    assert time.perf_counter() - started < 2.0
    (call,) = events
    assert isinstance(call, ToolCall) and json.loads(call.arguments)["content"] == content


def test_brace_prose_is_not_held_back() -> None:
    parser = OutputParser()
    assert parser.feed("{ no") == [ContentDelta("{ no")]
    assert parser.feed("t json") == [ContentDelta("t json")]
