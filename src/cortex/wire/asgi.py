"""Plain ASGI helpers shared by the middlewares and the gateway's hot path.

Why plain ASGI: an error answered here never reaches a framework (no request object, no
exception handler chain), and the hot path reads headers once from the scope instead of through
Starlette's case-insensitive multi-dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.wire.errors import OPENAI, ApiError

RawHeaders = list[tuple[bytes, bytes]]


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """The request headers as a dict with lower-case names (the first of repeated ones wins)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        if name not in headers:
            headers[name] = raw_value.decode("latin-1")
    return headers


def content_length(scope: Mapping[str, Any]) -> int | None:
    """The declared ``Content-Length``, or None when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_error(
    send: Any,
    error: ApiError,
    dialect: str = OPENAI,
    extra_headers: Mapping[str, str] | None = None,
    *,
    close: bool = False,
) -> None:
    """Answer ``error`` in ``dialect``'s envelope with its Retry-After. ``close`` when the
    request body was left unread on the wire: that connection cannot be reused."""
    body = error.to_bytes(dialect)
    headers: RawHeaders = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    merged = {**error.headers(), **(extra_headers or {})}
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
