"""What the proxy needs to know about a streamed answer, at as little CPU as possible.

Three facts matter for metrics: when the first *content* arrives (time to first token: the
neuron's opening ``{"role": "assistant", "content": ""}`` chunk is not a token) and the usage
the final chunk reports. Frames are parsed as JSON only while no content has been seen (the
first one or two frames) and when their bytes contain ``"usage"`` (the last one); every frame
in between passes through untouched. And whether the neuron failed the generation after its
headers went out (an in-band error frame): found by a byte test first.
"""

from __future__ import annotations

import json
from typing import Any

from cortex.wire.openai_types import stream_error

_CONTENT_KEYS = ("content", "reasoning_content", "tool_calls", "text")


def chunk_has_content(chunk: Any) -> bool:
    """True when a chat or completion chunk (parsed) carries text, reasoning or a tool call."""
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in _CONTENT_KEYS):
            return True
    return False


def _data(frame: bytes) -> Any:
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                return json.loads(line[5:])
            except ValueError:
                return None
    return None


def frames_have_content(frames: bytes) -> bool:
    """True when one of the complete SSE frames in ``frames`` carries content."""
    return any(chunk_has_content(_data(f)) for f in frames.split(b"\n\n") if f)


def take_usage(frames: bytes, drop_usage_only: bool) -> tuple[dict[str, Any] | None, bytes]:
    """The usage reported in ``frames`` (complete SSE frames), and the frames to forward:
    without the usage-only chunk (``"choices": []``) when ``drop_usage_only`` -- the gateway
    asked for usage on behalf of a client that did not."""
    usage: dict[str, Any] | None = None
    kept: list[bytes] = []
    dropped = False
    for frame in frames.split(b"\n\n"):
        if b'"usage"' in frame:
            payload = _data(frame)
            found = payload.get("usage") if isinstance(payload, dict) else None
            if isinstance(found, dict):
                usage = found
                if drop_usage_only and payload.get("choices") == []:
                    dropped = True
                    continue
        kept.append(frame)
    return usage, (b"\n\n".join(kept) if dropped else frames)


def stream_error_code(frames: bytes) -> str | None:
    """The code of a mid-stream error frame (``data: {"error": {...}}``) among ``frames``
    (complete SSE frames), or None: a neuron that fails a generation after its headers went out
    says so in-band, and the request is then recorded as failed, not ok. The byte test is
    exact enough: text content holding ``"error":`` arrives escaped (``\\"error\\":``)."""
    if b'"error":' not in frames:
        return None
    for frame in frames.split(b"\n\n"):
        payload = _data(frame) if b'"error":' in frame else None
        if isinstance(payload, dict):
            error = stream_error(payload)
            if error is not None:
                return error.code or "stream_error"
    return None
