"""Request body size limit as an ASGI middleware: 413 in the route's envelope, body unread.

Why a middleware and not a check in the handler: a handler that calls ``request.body()`` has
already buffered the whole body, so a 50 MB (or 5 GB) body would cost its memory before being
refused. Here a ``Content-Length`` over the limit is refused before a byte of the body is read,
and a chunked body is counted as it streams in and cut off at the first byte over the limit.
"""

from __future__ import annotations

from typing import Any

from cortex.wire.asgi import content_length, send_error
from cortex.wire.errors import ApiError
from cortex.wire.http import DialectForPath, default_dialect

DEFAULT_MAX_BODY_BYTES = 32 * 2**20


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "request_too_large",
        f"the request body is larger than this server's limit of {limit} bytes",
    )


class BodyTooLarge(ApiError):
    """Raised from ``receive`` when a streamed body passes the limit (handlers let it through
    to the app's ApiError handler, or the middleware answers it itself)."""


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 (plain ASGI: safe with streaming)."""

    def __init__(
        self,
        app: Any,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        dialect_for_path: DialectForPath = default_dialect,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.dialect_for_path = dialect_for_path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dialect = self.dialect_for_path(scope["path"])
        declared = content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, too_large(self.max_bytes), dialect, close=True)
            return

        seen = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    error = too_large(self.max_bytes)
                    raise BodyTooLarge(error.status, error.code, error.message)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await send_error(send, exc, dialect, close=True)
