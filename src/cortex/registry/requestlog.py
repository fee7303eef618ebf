"""An in-memory log of the requests a registry answered.

Tests read it to prove what a client did *on the wire*: which endpoint a token was sent to, that
a second fetch made no request, that a download resumed with a ``Range`` header. The raw
``Authorization`` value is kept in memory only (tests compare it); it is never printed or logged.
"""

from __future__ import annotations

import threading
from collections import deque

import attrs


@attrs.frozen
class LoggedRequest:
    """One request: method, raw path, query, the Authorization header as sent, Range, status."""

    method: str
    path: str
    query: str
    authorization: str | None = attrs.field(repr=False)
    range: str | None
    status: int

    @property
    def sent_token(self) -> bool:
        return self.authorization is not None


DEFAULT_CAPACITY = 10_000


class RequestLog:
    """Thread-safe, append-only, bounded (a long-running registry keeps only the newest
    ``capacity`` requests); ``entries()`` returns a snapshot copy."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._entries: deque[LoggedRequest] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
