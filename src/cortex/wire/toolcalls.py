"""Split streamed model output into content, reasoning and tool calls.

Models write tool calls and chain-of-thought as plain text in their own formats; clients expect
OpenAI ``tool_calls`` and a separate ``reasoning_content``. :class:`OutputParser` is fed the text
deltas a generation produces (in any split) and returns typed events as soon as they are certain:

- ``<think>...</think>`` becomes :class:`ReasoningDelta` and never reaches content;
- Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama 3 ``<|python_tag|>{json}`` or a bare JSON
  object as the whole answer, and Mistral ``[TOOL_CALLS][...]`` / ``[TOOL_CALLS]name[ARGS]{...}``
  become :class:`ToolCall` events (arguments as a JSON string, ids ``call_...``);
- everything else is :class:`ContentDelta`. Text that looked like a tool call but does not parse
  is returned as content verbatim: output is never dropped.

A marker cut across two deltas (``"<tool_"`` then ``"call>"``) is held back until it is decided,
so the concatenation of all events is the same whatever the split. The parser is pure and
single-threaded: one instance per generation.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from typing import Any

import attrs

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"

_ID_ALPHABET = string.ascii_letters + string.digits

# The first characters of every marker the parser looks for (OutputParser.feed's fast path).
assert {m[0] for m in (THINK_OPEN, HERMES_OPEN, PYTHON_TAG, MISTRAL_TOOL_CALLS)} <= {"<", "["}


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` + 24 random alphanumerics)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@attrs.frozen
class ContentDelta:
    """Answer text for the client."""

    text: str


@attrs.frozen
class ReasoningDelta:
    """Chain-of-thought text (``reasoning_content``), never part of the answer."""

    text: str


@attrs.frozen
class ToolCall:
    """One complete tool call; ``index`` counts calls in this generation from 0."""

    index: int
    id: str
    name: str
    arguments: str  # a JSON object, encoded

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry (non-streaming form)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def openai_delta(self) -> dict[str, Any]:
        """The OpenAI streaming ``delta.tool_calls`` entry carrying the whole call at once."""
        return {"index": self.index, **self.openai()}


OutputEvent = ContentDelta | ReasoningDelta | ToolCall


@attrs.frozen
class ParsedOutput:
    """A whole generation, split (what a non-streaming response carries)."""

    content: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]

    @property
    def finish_reason_override(self) -> str | None:
        """``"tool_calls"`` when the model called a tool (OpenAI's finish reason for that)."""
        return "tool_calls" if self.tool_calls else None


@attrs.define
class _JsonScan:
    """Finds where the JSON object/array at the start of a growing text ends.

    Resumable: each call scans only what was appended since the last one, so a long tool call
    streamed in small deltas costs linear time, not quadratic. Counts brackets outside strings;
    whether the value is valid JSON is decided later.
    """

    _text: str = ""  # the text scanned so far (the same string object, not a copy)
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def end(self, text: str) -> int | None:
        """Index just past the value, 0 if ``text`` does not start one, None while incomplete."""
        if not text or text[0] not in "[{":
            return 0 if text else None
        if not self._text or not text.startswith(self._text):
            self._text, self._depth, self._in_string, self._escaped = "", 0, False, False
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        for position in range(len(self._text), len(text)):
            char = text[position]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    self._text = ""
                    return position + 1
        self._text, self._depth, self._in_string, self._escaped = text, depth, in_string, escaped
        return None


# Parser modes.
_TEXT = "text"
_THINK = "think"
_HERMES = "hermes"
_JSON_CALLS = "json_calls"  # after <|python_tag|>, [TOOL_CALLS], or a bare JSON answer


@attrs.define
class OutputParser:
    """Incremental splitter; see the module docstring.

    ``tools`` enables tool-call parsing (pass ``False`` when the request offered no tools, so a
    model that writes ``<tool_call>`` anyway is answered verbatim). ``reasoning`` enables the
    ``<think>`` split; ``starts_in_reasoning`` is for templates that open ``<think>`` in the prompt
    so the output begins inside the reasoning and only closes it.
    """

    tools: bool = True
    reasoning: bool = True
    starts_in_reasoning: bool = False
    new_id: Callable[[], str] = new_tool_call_id

    _buffer: str = attrs.field(default="", init=False)
    _mode: str = attrs.field(default=_TEXT, init=False)
    _raw_start: str = attrs.field(default="", init=False)  # marker that opened a json_calls run
    _content_started: bool = attrs.field(default=False, init=False)
    _strip_leading: bool = attrs.field(default=False, init=False)
    _calls: int = attrs.field(default=0, init=False)
    _between_calls: bool = attrs.field(default=False, init=False)  # separators may follow
    _scan: _JsonScan = attrs.field(factory=_JsonScan, init=False)
    _finished: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if self.reasoning and self.starts_in_reasoning:
            self._mode = _THINK

    @property
    def tool_call_count(self) -> int:
        return self._calls

    def feed(self, text: str) -> list[OutputEvent]:
        """Add a text delta; returns the events it made certain (possibly none)."""
        if self._finished:
            raise RuntimeError("OutputParser.feed after finish")
        # Fast path for plain answer text (nearly every token): nothing held back, in answer
        # text, no leading whitespace to strip, no bare-JSON detection pending, and no character
        # that starts a marker (every marker starts with "<" or "["; without one, no marker and
        # no partial marker can be in the text). What the state machine would do then: emit
        # the text as one content delta. Property-tested against the state machine.
        if (
            not self._buffer
            and self._mode == _TEXT
            and not self._strip_leading
            and (self._content_started or not self.tools)
            and "<" not in text
            and "[" not in text
        ):
            if not text:
                return []
            if not self._content_started and text.strip():
                self._content_started = True
            return [ContentDelta(text)]
        self._buffer += text
        return self._drain(final=False)

    def _feed_slow(self, text: str) -> list[OutputEvent]:
        """:meth:`feed` without its fast path (the reference the tests compare it with)."""
        if self._finished:
            raise RuntimeError("OutputParser.feed after finish")
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[OutputEvent]:
        """End of generation: everything still held back is decided now."""
        if self._finished:
            return []
        events = self._drain(final=True)
        self._finished = True
        return events

    # --- the state machine -------------------------------------------------------------------

    def _markers(self) -> list[str]:
        markers = []
        if self.reasoning:
            markers.append(THINK_OPEN)
        if self.tools:
            markers += [HERMES_OPEN, PYTHON_TAG, MISTRAL_TOOL_CALLS]
        return markers

    def _drain(self, final: bool) -> list[OutputEvent]:
        events: list[OutputEvent] = []
        while True:
            before = (self._mode, len(self._buffer))
            if self._mode == _TEXT:
                self._step_text(events, final)
            elif self._mode == _THINK:
                self._step_think(events, final)
            elif self._mode == _HERMES:
                self._step_hermes(events, final)
            else:
                self._step_json_calls(events, final)
            if (self._mode, len(self._buffer)) == before:
                break
        return _coalesce(events)

    def _emit_content(self, events: list[OutputEvent], text: str) -> None:
        if self._strip_leading:
            stripped = text.lstrip()
            if not stripped:
                return
            self._strip_leading = False
            text = stripped
        if text:
            if text.strip():
                self._content_started = True
            events.append(ContentDelta(text))

    def _step_text(self, events: list[OutputEvent], final: bool) -> None:
        buffer = self._buffer
        if not buffer:
            return
        # A bare JSON object as the whole answer is a Llama 3 style tool call.
        if self.tools and not self._content_started:
            stripped = buffer.lstrip()
            if not stripped:
                if final:
                    self._emit_content(events, buffer)
                    self._buffer = ""
                return  # only whitespace so far: wait to see what starts the answer
            if stripped[0] == "{":
                # Leading whitespace is kept aside: given back only if this is not a call.
                self._raw_start = buffer[: len(buffer) - len(stripped)]
                self._buffer = stripped
                self._mode = _JSON_CALLS
                return
        markers = self._markers()
        found = _earliest(buffer, markers)
        if found is not None:
            position, marker = found
            self._emit_content(events, buffer[:position])
            self._buffer = buffer[position + len(marker) :]
            if marker == THINK_OPEN:
                self._mode = _THINK
            elif marker == HERMES_OPEN:
                self._mode = _HERMES
            else:
                self._mode = _JSON_CALLS
                self._raw_start = marker
            return
        keep = 0 if final else _partial_suffix(buffer, markers)
        self._emit_content(events, buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep :]

    def _step_think(self, events: list[OutputEvent], final: bool) -> None:
        buffer = self._buffer
        position = buffer.find(THINK_CLOSE)
        if position >= 0:
            if position:
                events.append(ReasoningDelta(buffer[:position]))
            self._buffer = buffer[position + len(THINK_CLOSE) :]
            self._mode = _TEXT
            self._strip_leading = True
            return
        keep = 0 if final else _partial_suffix(buffer, [THINK_CLOSE])
        if len(buffer) - keep:
            events.append(ReasoningDelta(buffer[: len(buffer) - keep]))
        self._buffer = buffer[len(buffer) - keep :]

    def _step_hermes(self, events: list[OutputEvent], final: bool) -> None:
        buffer = self._buffer
        head = buffer.lstrip()
        if head and head[0] not in "[{":  # the tag mentioned in prose, not a call: stream on
            self._emit_content(events, HERMES_OPEN)
            self._mode = _TEXT
            return
        position = buffer.find(HERMES_CLOSE)
        if position < 0 and not final:
            return
        body = buffer if position < 0 else buffer[:position]
        closing = "" if position < 0 else HERMES_CLOSE
        calls = _calls_from_json_text(body)
        if calls is None:
            self._emit_content(events, HERMES_OPEN + body + closing)
        else:
            self._add_calls(events, calls)
            self._strip_leading = True  # whitespace between or after calls is not an answer
        self._buffer = "" if position < 0 else buffer[position + len(HERMES_CLOSE) :]
        self._mode = _TEXT

    def _step_json_calls(self, events: list[OutputEvent], final: bool) -> None:
        if self._between_calls:
            self._continue_after_call(final)
            return
        buffer = self._buffer
        stripped = buffer.lstrip()
        if not stripped:
            if final:
                self._emit_content(events, self._raw_start + buffer)
                self._buffer = ""
                self._mode = _TEXT
            return
        if stripped.startswith(MISTRAL_TOOL_CALLS):  # another Mistral run follows
            self._buffer = stripped[len(MISTRAL_TOOL_CALLS) :]
            self._raw_start = MISTRAL_TOOL_CALLS
            return
        if not final and MISTRAL_TOOL_CALLS.startswith(stripped):
            return  # could still become the marker
        if self._raw_start.strip() == "" and stripped[0] == "{":
            inner = stripped[1:].lstrip()
            if inner and inner[0] != '"':  # a brace, but no object with keys: plain text
                self._emit_content(events, self._raw_start + buffer)
                self._buffer = ""
                self._back_to_text()
                return
        if self._raw_start == MISTRAL_TOOL_CALLS and stripped[0] not in "[{":
            self._step_mistral_named(events, final)
            return
        end = self._scan.end(stripped)
        if end is None:
            if final:  # never completed: give the text back
                self._emit_content(events, self._raw_start + buffer)
                self._buffer = ""
                self._mode = _TEXT
            return
        raw = buffer[: len(buffer) - len(stripped) + end]
        calls = _calls_from_json_text(stripped[:end])
        self._buffer = buffer[len(raw) :]
        if calls is None:
            self._emit_content(events, self._raw_start + raw)
            self._back_to_text()
        else:
            self._add_calls(events, calls)
            self._continue_after_call(final)

    def _step_mistral_named(self, events: list[OutputEvent], final: bool) -> None:
        """Mistral v11+: ``[TOOL_CALLS]name[ARGS]{...}`` (repeated for several calls)."""
        buffer = self._buffer
        args_at = buffer.find(MISTRAL_ARGS)
        if args_at < 0:
            if final:
                self._emit_content(events, self._raw_start + buffer)
                self._buffer = ""
                self._mode = _TEXT
            return
        name = buffer[:args_at].strip()
        rest = buffer[args_at + len(MISTRAL_ARGS) :]
        stripped = rest.lstrip()
        end = self._scan.end(stripped) if stripped else None
        if end is None:
            if final:
                self._emit_content(events, self._raw_start + buffer)
                self._buffer = ""
                self._mode = _TEXT
            return
        consumed = args_at + len(MISTRAL_ARGS) + len(rest) - len(stripped) + end
        arguments = _arguments_json(_loads(stripped[:end]))
        self._buffer = buffer[consumed:]
        if not name or arguments is None:
            self._emit_content(events, self._raw_start + buffer[:consumed])
            self._back_to_text()
        else:
            self._add_calls(events, [(name, arguments)])
            self._continue_after_call(final)

    def _continue_after_call(self, final: bool) -> None:
        """After a call: more may follow (``;``/``,``, ``[TOOL_CALLS]``), or answer text."""
        rest = self._buffer.lstrip(" \t\r\n;,")
        self._raw_start = ""
        more = rest.startswith(("{", "[", MISTRAL_TOOL_CALLS))
        undecided = not final and (not rest or MISTRAL_TOOL_CALLS.startswith(rest))
        self._between_calls = undecided and not more
        if more or undecided:
            self._buffer = rest
            return
        self._back_to_text()
        self._strip_leading = True

    def _back_to_text(self) -> None:
        """Leave a JSON run: what follows is answer text (no second bare-JSON detection)."""
        self._mode = _TEXT
        self._raw_start = ""
        self._between_calls = False
        self._content_started = True

    def _add_calls(self, events: list[OutputEvent], calls: list[tuple[str, str]]) -> None:
        for name, arguments in calls:
            events.append(ToolCall(self._calls, self.new_id(), name, arguments))
            self._calls += 1


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an opened ``<think>`` (DeepSeek-R1 style templates).

    Such models never write ``<think>`` themselves; their output starts with reasoning and only
    closes it. Pass the result as ``starts_in_reasoning`` so that reasoning does not reach content.
    """
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


def parse_output(
    text: str,
    *,
    tools: bool = True,
    reasoning: bool = True,
    starts_in_reasoning: bool = False,
    new_id: Callable[[], str] = new_tool_call_id,
) -> ParsedOutput:
    """Split a whole generation at once (the non-streaming path)."""
    parser = OutputParser(
        tools=tools, reasoning=reasoning, starts_in_reasoning=starts_in_reasoning, new_id=new_id
    )
    return collect(parser.feed(text) + parser.finish())


def collect(events: list[OutputEvent]) -> ParsedOutput:
    """Fold events into the non-streaming form."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls = tuple(e for e in events if isinstance(e, ToolCall))
    return ParsedOutput(content, reasoning, calls)


# --- helpers ---------------------------------------------------------------------------------


def _coalesce(events: list[OutputEvent]) -> list[OutputEvent]:
    """Merge neighbouring deltas of one kind (fewer, larger chunks for the client)."""
    merged: list[OutputEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
            merged[-1] = ContentDelta(last.text + event.text)
        elif isinstance(event, ReasoningDelta) and isinstance(last, ReasoningDelta):
            merged[-1] = ReasoningDelta(last.text + event.text)
        else:
            merged.append(event)
    return merged


def _earliest(buffer: str, markers: list[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for marker in markers:
        position = buffer.find(marker)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, marker)
    return best


def _partial_suffix(buffer: str, markers: list[str]) -> int:
    """Length of the longest end of ``buffer`` that could be the start of a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(buffer)), longest, -1):
            if buffer.endswith(marker[:size]):
                longest = size
                break
    return longest


_INVALID = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID


def _arguments_json(arguments: Any) -> str | None:
    """Arguments as an encoded JSON object; a JSON-encoded string is accepted as well."""
    if isinstance(arguments, str):
        arguments = _loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)


def _call_from_object(value: Any) -> tuple[str, str] | None:
    """``{"name", "arguments"|"parameters"}`` (also OpenAI's ``{"function": {...}}``)."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    encoded = _arguments_json(arguments)
    return None if encoded is None else (name, encoded)


def _calls_from_json_text(text: str) -> list[tuple[str, str]] | None:
    """One call object or a list of them; None when anything in it is not a call."""
    value = _loads(text.strip())
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = [_call_from_object(item) for item in items]
    if any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


__all__ = [
    "ContentDelta",
    "OutputEvent",
    "OutputParser",
    "ParsedOutput",
    "ReasoningDelta",
    "ToolCall",
    "collect",
    "new_tool_call_id",
    "parse_output",
    "prompt_opens_reasoning",
]
