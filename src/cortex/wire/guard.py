"""uvicorn's HTTP protocol with two limits it lacks: a header timeout and a header size cap.

Why: uvicorn arms no timer while a request's headers arrive (its keep-alive timer runs only
*between* requests) and its C parser (httptools) takes headers of any size. A client sending a
header line a second held its connection for as long as it liked (200 of them: 200 sockets and
parsers, for minutes), and a 100 KB header block was parsed and buffered before the key check
could run. Here, per connection:

- the headers of a request must be complete within ``header_timeout`` seconds of its first byte
  (of the connection's opening, for the first request: a connection that sends nothing is
  closed too); otherwise 408 and the connection is closed, as nginx's ``client_header_timeout``;
- the request line and headers may hold at most ``max_header_bytes``; otherwise 431 and close.

Bodies are not affected: the body size limit is :mod:`cortex.wire.limits`, and a slow body is
bounded by the route (a generation request's body is read before anything else happens). The
limits apply before any route, key check or middleware runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with the limits above (set by :func:`guarded_protocol`)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = False
        self._header_bytes = 0
        self._refused = False

    # ---- the header phase of each request ----------------------------------------------------

    def _start_header_phase(self) -> None:
        self._in_headers = True
        self._header_bytes = 0
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            log.info(
                "closing a connection from %s: request headers incomplete after %gs",
                self.client[0] if self.client else "?",
                self.header_timeout,
            )
            self._refuse(408, f"request headers not complete within {self.header_timeout:g}s")

    def _refuse(self, status: int, message: str) -> None:
        self._in_headers = False
        self._refused = True  # whatever the parser still calls back with is dropped
        self._stop_header_timer()
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()

    # ---- protocol callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_phase()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still in the headers after this chunk: everything fed so far was header bytes.
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            self._refuse(431, f"request headers larger than {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._start_header_phase()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        self._stop_header_timer()
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.max_header_bytes:  # all of it arrived in one read
            self._refuse(431, f"request headers larger than {self.max_header_bytes} bytes")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()


def guarded_protocol(
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": float(header_timeout), "max_header_bytes": int(max_header_bytes)},
    )
