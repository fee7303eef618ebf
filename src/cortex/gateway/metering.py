"""Output tokens counted as a stream passes, and a clean end when the key's budget is spent.

Why here, on the neuron's bytes: the same wrapper serves every dialect. The neuron streams OpenAI
chat (or completion) chunks; a pass-through route relays them, a translated route turns them into
Anthropic or Responses events. Counting and cutting *before* either happens means a stream cut at
the budget looks, to every client, like an answer that reached its ``max_tokens``: the last
content, a final chunk with ``finish_reason: "length"`` and the usage so far, ``[DONE]`` -- which
the Anthropic translator turns into ``stop_reason: "max_tokens"`` and ``message_stop``, and the
Responses one into ``response.incomplete``. The neuron's connection is closed at once, so it stops
generating within one step.

Counting reads bytes, never parses a frame: each chunk the neuron sends with content holds at
least one token, so the count of content deltas is a lower bound that is cheap enough for every
chunk (two ``bytes.count`` calls). The exact usage replaces it when the answer ends.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from cortex.wire.sse import DONE, encode_data

_ID = re.compile(rb'"id":\s*"([^"\\]{1,200})"')
# Both spellings: the neuron writes compact JSON, other servers json.dumps' default.
_FIELDS = (b'"content":', b'"reasoning_content":', b'"arguments":', b'"text":')
_CONTENT = tuple(f + b'"' for f in _FIELDS) + tuple(f + b' "' for f in _FIELDS)
_EMPTY = (b'"content":""', b'"content": ""')


class Meter(Protocol):
    """What a metered stream reports to (:class:`cortex.gateway.tally.Tally`)."""

    cut: bool

    def on_streamed(self, tokens: int) -> bool:
        """``tokens`` more output tokens; False when the key's budget is spent."""
        ...

    def on_usage(self, usage: dict[str, Any]) -> None: ...

    def streamed_usage(self) -> tuple[int, int]:
        """(prompt, completion) as known now."""
        ...


def content_deltas(data: bytes) -> int:
    """How many chunks in ``data`` carry text, reasoning, tool-call arguments or completion
    text (an empty string is not counted: ``"content": ""`` does not match)."""
    return sum(data.count(p) for p in _CONTENT) - sum(data.count(p) for p in _EMPTY)


def end_frames(kind: str, ident: str, model: str, prompt: int, completion: int) -> bytes:
    """The frames that end a stream at the budget: a final chunk with ``finish_reason:
    "length"``, a usage chunk (``choices: []``), ``[DONE]``."""
    created = int(time.time())
    if kind == "completion":
        final: dict[str, Any] = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}],
        }
        usage_object = "text_completion"
    else:
        final = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}],
        }
        usage_object = "chat.completion.chunk"
    usage = {
        "id": ident,
        "object": usage_object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return encode_data(final) + encode_data(usage) + DONE


def _strip_first_usage(data: bytes, meter: Meter) -> bytes:
    """The first frame's ``usage`` (the prompt's length, asked for by the gateway alone) taken
    out and reported to the meter; the frame without it goes on."""
    head, sep, rest = data.partition(b"\n\n")
    if not head.startswith(b"data: ") or b'"usage"' not in head:
        return data
    try:
        chunk = json.loads(head[6:])
    except ValueError:
        return data
    usage = chunk.pop("usage", None) if isinstance(chunk, dict) else None
    if not isinstance(usage, dict):
        return data
    meter.on_usage(usage)
    return encode_data(chunk)[:-2] + sep + rest


async def metered(
    chunks: AsyncIterator[bytes],
    meter: Meter,
    kind: str,
    model: str,
    strip_first_usage: bool = False,
) -> AsyncIterator[bytes]:
    """``chunks`` (a neuron's SSE bytes) with output tokens counted; once the budget is spent
    at the end of a frame, the end frames (:func:`end_frames`) instead of the rest. ``kind``:
    ``chat`` or ``completion``; ``strip_first_usage``: see :func:`_strip_first_usage`."""
    ident = "cortex-budget"
    first = True
    async for data in chunks:
        if first:
            first = False
            found = _ID.search(data)
            if found:
                ident = found.group(1).decode()
            if strip_first_usage:
                data = _strip_first_usage(data, meter)
        counted = content_deltas(data)
        yield data
        if counted and not meter.on_streamed(counted) and data.endswith(b"\n\n"):
            meter.cut = True
            prompt, completion = meter.streamed_usage()
            yield end_frames(kind, ident, model, prompt, completion)
            return
