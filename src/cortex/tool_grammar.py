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

from cortex.harness import ToolCallFormat

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


__all__ = ["HERMES_CLOSE", "HERMES_OPEN", "ToolCallStyle", "call_schema", "tool_call_style"]
