"""OutputParser.feed's plain-text fast path gives exactly what the state machine gives."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.wire.toolcalls import ContentDelta, OutputParser, ReasoningDelta

# Pieces that exercise every marker, partial markers, JSON, whitespace and plain words.
_PIECES = [
    "Hello",
    " world",
    " ",
    "\n",
    "  ",
    "é",
    "<",
    "[",
    "<think>",
    "</think>",
    "<thi",
    "nk>",
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "call>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "[TOOL_",
    "CALLS]",
    "[ARGS]",
    '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g"',
    ', "parameters": {}}',
    "{",
    "}",
    "]",
    ";",
    ",",
    "plain text. ",
    "a < b",
    "x[1]",
]


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _run(deltas: list[str], fast: bool, **flags: bool) -> list:
    parser = OutputParser(new_id=_ids(), **flags)
    feed = parser.feed if fast else parser._feed_slow
    out = [feed(text) for text in deltas]
    out.append(parser.finish())
    return out


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=14),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_fast_path_matches_the_state_machine(
    deltas: list[str], tools: bool, reasoning: bool, starts_in_reasoning: bool
) -> None:
    flags = {"tools": tools, "reasoning": reasoning, "starts_in_reasoning": starts_in_reasoning}
    assert _run(deltas, True, **flags) == _run(deltas, False, **flags)


def test_plain_text_takes_the_fast_path() -> None:
    parser = OutputParser(tools=True)
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(" there") == [ContentDelta(" there")]
    assert parser.feed("") == []
    assert parser.feed(" <thi") == [ContentDelta(" ")]  # the slow path holds the partial marker
    assert parser.feed("nk>why</think>  ok") == [ReasoningDelta("why"), ContentDelta("ok")]
    assert parser.finish() == []
