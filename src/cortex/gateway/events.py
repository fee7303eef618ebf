"""The gateway's recent loads and evictions, for ``GET /admin/events`` and ``cortex status``.

Metrics say how many; an operator at a terminal asks *which* model was loaded or evicted, where,
why and how long it took. A bounded ring (the last :data:`MAX_EVENTS`) is enough for that and
costs nothing on the request path: events happen only on loads and unloads.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import attrs

MAX_EVENTS = 200


@attrs.frozen
class FleetEvent:
    at: float  # unix time
    kind: str  # "load" or "evict"
    model: str
    node: str
    outcome: str  # load: ok | failed; evict: memory | keep_alive | manual
    duration_s: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RecentEvents:
    events: deque[FleetEvent] = attrs.field(factory=lambda: deque(maxlen=MAX_EVENTS))

    def add(self, event: FleetEvent) -> None:
        self.events.append(event)

    def load(
        self, model: str, node: str, outcome: str, duration_s: float, error: str | None = None
    ) -> None:
        self.add(FleetEvent(time.time(), "load", model, node, outcome, round(duration_s, 3), error))

    def eviction(self, model: str, node: str, reason: str) -> None:
        self.add(FleetEvent(time.time(), "evict", model, node, reason))

    def latest(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first."""
        return [e.to_json() for e in list(self.events)[::-1][: max(0, limit)]]
