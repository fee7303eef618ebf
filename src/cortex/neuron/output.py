"""The one seam between generated chat text and what the client sees.

Every text delta of a chat generation goes through :func:`output_parser`: tool calls (when the
request offered tools) and ``<think>`` reasoning are split out by
:class:`cortex.wire.toolcalls.OutputParser`; the rest is content. ``/v1/completions`` returns raw
text and skips this.
"""

from __future__ import annotations

from cortex.wire.toolcalls import (
    ContentDelta,
    OutputEvent,
    OutputParser,
    ReasoningDelta,
    ToolCall,
)


def output_parser(tools_offered: bool, starts_in_reasoning: bool = False) -> OutputParser:
    """Tool calls are parsed only when the request offered tools (otherwise a model writing
    ``<tool_call>`` is answered verbatim); reasoning is always split out. ``starts_in_reasoning``
    when the rendered prompt already opened ``<think>`` (the output begins inside it)."""
    return OutputParser(
        tools=tools_offered, reasoning=True, starts_in_reasoning=starts_in_reasoning
    )


__all__ = [
    "ContentDelta",
    "OutputEvent",
    "OutputParser",
    "ReasoningDelta",
    "ToolCall",
    "output_parser",
]
