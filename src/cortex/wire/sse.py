"""Server-sent events: encoding and incremental decoding of ``data:`` frames."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode_data(payload: Any) -> bytes:
    """One ``data:`` frame; dicts are JSON-encoded compactly."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def encode_event(event: str, payload: Any) -> bytes:
    """An ``event:`` + ``data:`` frame (the Anthropic and Responses streaming style)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


COMMENT_KEEPALIVE = b": keep-alive\n\n"


class SseDecoder:
    """Feed bytes as they arrive; get complete events (``(event, data)`` pairs) out.

    Handles frames split across chunks and several frames in one chunk; ignores comments.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[str | None, str]]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            event: str | None = None
            data_lines: list[str] = []
            for line in frame.decode("utf-8", errors="replace").split("\n"):
                if line.startswith(":") or not line:
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data_lines.append(value)
            if data_lines:
                yield event, "\n".join(data_lines)

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete frame still buffered (non-empty at EOF means a cut stream)."""
        return self._buffer
