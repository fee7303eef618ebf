"""What a constrained tool call looks like in a model's own syntax: shared by the harnesses
that enforce ``strict`` tools and ``tool_choice`` (:class:`cortex.harness.ToolCallFormat`).

A model writes tool calls the way its chat template taught it; :mod:`cortex.wire.toolcalls`
parses every known syntax back into OpenAI ``tool_calls``. To hold a call to its schema, a
harness needs to know which syntax this model uses, and the JSON a call must be:

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per
  call (Qwen 2.5 / 3, Hermes, most templates that render tools): the template mentions
  ``<tool_call>``;
- ``llama3_json``: the whole answer is one ``{"name": ..., "parameters": {...}}`` object
  (Llama 3.1-3.3 templates: ``<|python_tag|>`` or the ``"parameters"`` instruction).

A template with neither (Mistral's ``[TOOL_CALLS]`` control token, a template without tools)
has no style: a harness cannot hold its calls to a schema, and says so when a call is required.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from cortex.harness import ConstraintError, ResponseFormat, ToolCallFormat

ToolCallStyle = Literal["hermes", "llama3_json"]

HERMES_OPEN = "<tool_call>\n"
HERMES_CLOSE = "\n</tool_call>"


def tool_call_style(chat_template: str | None) -> ToolCallStyle | None:
    """The tool-call syntax a chat template teaches its model (see the module docstring)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters": dictionary' in chat_template:
        return "llama3_json"
    return None


def call_schema(tool_calls: ToolCallFormat, style: ToolCallStyle) -> dict[str, Any]:
    """The JSON Schema of one call in ``style``: the name of one of the tools and arguments
    that validate against that tool's schema (an ``anyOf``, one branch per tool)."""
    arguments_key = "parameters" if style == "llama3_json" else "arguments"
    branches = []
    for tool in tool_calls.tools:
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    arguments_key: json.loads(tool.parameters),
                },
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def response_format_schema(response_format: ResponseFormat) -> str:
    """The JSON Schema (JSON text) a response format holds an answer to."""
    if response_format.type == "json_object":
        return json.dumps({"type": "object"})
    if response_format.type == "json_schema" and response_format.schema is not None:
        return response_format.schema
    raise ConstraintError(f"response_format {response_format.type!r} cannot be enforced")


# llguidance's JsonCompileOptions (a TypedDict): compact JSON, since a small model given free
# whitespace can spend its whole token budget on it
JSON_COMPACT: Any = {"whitespace_flexible": False}


def compact_schema(schema: dict[str, Any]) -> str:
    """A schema for llguidance's ``%json``, compact JSON unless it asks otherwise."""
    return json.dumps({**schema, "x-guidance": {**JSON_COMPACT, **schema.get("x-guidance", {})}})


def _lark_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lark string literal


def tool_call_grammar(
    tool_calls: ToolCallFormat, style: ToolCallStyle | None, text: ResponseFormat | None
) -> str:
    """The Lark grammar (llguidance's dialect) of an answer with tool calls in ``style``;
    ``text``: the format the answer must follow when it is not a call."""
    if style is None:
        raise ConstraintError(
            "this model's chat template writes tool calls in no syntax cortex can hold to a "
            "schema (it knows <tool_call> blocks and Llama 3 JSON calls)",
            param="tool_choice" if tool_calls.required else "tools",
        )
    try:
        call = compact_schema(call_schema(tool_calls, style))
        answer = (
            compact_schema(json.loads(response_format_schema(text))) if text is not None else None
        )
    except ValueError as exc:
        raise ConstraintError(
            f"a tool's parameters are not a JSON Schema: {exc}", param="tools"
        ) from None
    free = "answer" if answer else "FREE"
    rules = [f"call: %json {call}"]
    if answer:
        rules.append(f"answer: %json {answer}")
    if style == "hermes":
        opener, close = _lark_literal(HERMES_OPEN), _lark_literal(HERMES_CLOSE)
        more = f'("\\n" {opener} call {close})*'
        if tool_calls.required:
            rules.insert(0, f"start: {opener} call {close} {more}")
        else:
            # free text that never writes the marker, or text up to the marker, then calls
            marker = HERMES_OPEN.strip()
            rules.insert(0, f"start: {free} | lead calls")
            rules.append(f"lead[stop={_lark_literal(marker)}]: /(?s:.*)/")
            rules.append(f'calls: "\\n" call {close} {more}')
            if not answer:
                rules.append(f"FREE: /(?s:.*)/ & ~/(?s:.*{marker}.*)/")
    else:  # llama3_json: the whole answer is one call
        rules.insert(0, "start: call" if tool_calls.required else f"start: {free} | call")
        if not answer and not tool_calls.required:
            rules.append("FREE: /(?s:.*)/ & ~/(?s:\\s*\\{.*)/")
    return "\n".join(rules) + "\n"


__all__ = [
    "HERMES_CLOSE",
    "HERMES_OPEN",
    "JSON_COMPACT",
    "ToolCallStyle",
    "call_schema",
    "compact_schema",
    "response_format_schema",
    "tool_call_grammar",
    "tool_call_style",
]
