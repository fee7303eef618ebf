"""Traffic over the last minutes, per model and node, for the dashboard's small charts.

Why sample the gateway's own Prometheus metrics instead of recording per request: the request
path already counts everything (completion tokens, time to first token, requests) in
:class:`cortex.gateway.metrics.GatewayMetrics`, so the dashboard adds nothing to it. Every
:data:`STEP_S` seconds a background task reads the running totals and keeps the difference
since the last read: generated tokens per second, the mean time to first token of the streams
that got their first token in that step, requests and errors. :data:`WINDOW_S` of points are
kept per (model, node); a pair silent for a whole window is dropped.

Tokens are counted when an answer ends (that is when a neuron reports usage), so a long stream
shows up in the step where it finished.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import attrs

from cortex.gateway.metrics import NO_NODE, OTHER, GatewayMetrics

log = logging.getLogger(__name__)

STEP_S = 5.0
WINDOW_S = 600.0

Key = tuple[str, str]  # (model, node)


@attrs.define
class Totals:
    tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    requests: float = 0.0
    errors: float = 0.0


@attrs.frozen
class Point:
    at: float
    tokens_per_s: float
    ttft_s: float | None
    requests: int
    errors: int


def _samples(metric: Any, suffix: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                found.append((sample.labels, sample.value))
    return found


def read_totals(metrics: GatewayMetrics) -> dict[Key, Totals]:
    """The running totals of every (model, node) a neuron answered for."""
    totals: dict[Key, Totals] = {}

    def at(labels: dict[str, str]) -> Totals | None:
        model, node = labels.get("model", OTHER), labels.get("node", NO_NODE)
        if node == NO_NODE or model == OTHER:
            return None
        return totals.setdefault((model, node), Totals())

    for labels, value in _samples(metrics.completion_tokens, "_total"):
        if (t := at(labels)) is not None:
            t.tokens += value
    for labels, value in _samples(metrics.ttft, "_sum"):
        if (t := at(labels)) is not None:
            t.ttft_sum += value
    for labels, value in _samples(metrics.ttft, "_count"):
        if (t := at(labels)) is not None:
            t.ttft_count += value
    for labels, value in _samples(metrics.requests, "_total"):
        if (t := at(labels)) is not None:
            t.requests += value
            if labels.get("status") == "error":
                t.errors += value
    return totals


class TrafficSeries:
    """Points of the last ``window_s`` seconds, one per ``step_s``, per (model, node)."""

    def __init__(
        self, metrics: GatewayMetrics, step_s: float = STEP_S, window_s: float = WINDOW_S
    ) -> None:
        self.metrics = metrics
        self.step_s = step_s
        self.window_s = window_s
        self.points: dict[Key, deque[Point]] = {}
        self._last: dict[Key, Totals] = {}
        self._last_at: float | None = None
        # the event loop samples and serves; a test (or a thread) may sample too
        self._lock = threading.Lock()

    def sample(self, now: float | None = None) -> None:
        """Read the totals and append one point per (model, node) seen so far."""
        with self._lock:
            self._sample(time.time() if now is None else now)

    def _sample(self, now: float) -> None:
        totals = read_totals(self.metrics)
        if self._last_at is not None and now > self._last_at:
            elapsed = now - self._last_at
            for key, total in totals.items():
                before = self._last.get(key, Totals())
                ttft_count = total.ttft_count - before.ttft_count
                point = Point(
                    at=round(now, 3),
                    tokens_per_s=round(max(0.0, total.tokens - before.tokens) / elapsed, 3),
                    ttft_s=(
                        round((total.ttft_sum - before.ttft_sum) / ttft_count, 4)
                        if ttft_count > 0
                        else None
                    ),
                    requests=int(total.requests - before.requests),
                    errors=int(total.errors - before.errors),
                )
                maxlen = max(2, int(self.window_s / self.step_s) + 1)
                self.points.setdefault(key, deque(maxlen=maxlen)).append(point)
        self._last, self._last_at = totals, now
        self._forget_silent(now)

    def _forget_silent(self, now: float) -> None:
        for key in [k for k, points in self.points.items() if not _active(points, now, self)]:
            del self.points[key]

    def to_json(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._to_json()

    def _to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "model": model,
                "node": node,
                "at": [p.at for p in points],
                "tokens_per_s": [p.tokens_per_s for p in points],
                "ttft_s": [p.ttft_s for p in points],
                "requests": [p.requests for p in points],
                "errors": [p.errors for p in points],
            }
            for (model, node), points in sorted(self.points.items())
        ]

    async def run(self) -> None:
        """Sample every ``step_s`` until cancelled (the gateway's lifespan runs it)."""
        while True:
            try:
                self.sample()
            except Exception:  # a chart is never worth a dead sampler
                log.exception("dashboard traffic sample failed")
            await asyncio.sleep(self.step_s)


def _active(points: deque[Point], now: float, series: TrafficSeries) -> bool:
    """Any traffic within the window (else the pair is dropped from the charts)."""
    return any(p.requests or p.tokens_per_s for p in points if now - p.at <= series.window_s)
