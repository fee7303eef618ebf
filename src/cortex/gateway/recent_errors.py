"""The gateway's recent request errors, for ``GET /admin/status`` and the dashboard.

Metrics count errors by code; an operator looking at a fleet asks *which* requests failed just
now, for which model, on which node and why. A bounded ring (the last :data:`MAX_ERRORS`) answers
that and costs the request path nothing unless a request fails (one append).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import attrs

MAX_ERRORS = 100
# Client-controlled text (a model name asked for, a message quoting it) is cut to this length.
MAX_TEXT = 300


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


@attrs.frozen
class RequestError:
    at: float  # unix time
    route: str  # the path asked for (cut)
    model: str | None  # the canonical id, or the name the client sent when it did not resolve
    node: str  # the node that answered, or "none" when it failed before one was picked
    code: str
    status: int | None = None  # the HTTP status, when the gateway answered before a neuron
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RecentErrors:
    errors: deque[RequestError] = attrs.field(factory=lambda: deque(maxlen=MAX_ERRORS))

    def add(
        self,
        route: str,
        model: str | None,
        node: str,
        code: str,
        status: int | None = None,
        message: str | None = None,
    ) -> None:
        self.errors.append(
            RequestError(
                time.time(), _cut(route) or "", _cut(model), node, code, status, _cut(message)
            )
        )

    def latest(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` errors, newest first."""
        return [e.to_json() for e in list(self.errors)[::-1][: max(0, limit)]]
