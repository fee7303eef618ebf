"""ASGI middleware of the neuron's app."""

from __future__ import annotations

import time
from typing import Any

from cortex.neuron.node import Node


class RequestCounter:
    """Counts requests by route template and status. A plain ASGI middleware (not
    ``BaseHTTPMiddleware``, whose wrapped ``receive`` reports a disconnect as soon as a
    streaming response has started, which would cut every stream short)."""

    def __init__(self, app: Any, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics = self.node.metrics
            metrics.series(metrics.requests, path, str(status)).inc()
            metrics.series(metrics.duration, path).observe(time.monotonic() - started)
