"""Prometheus metrics of the gateway, on a registry of its own (served on ``metrics_listen``).

Label values are bounded: routes are the gateway's own, models are canonical ids from the
catalogue or ``other``, nodes are the configured neuron names, codes are the gateway's codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_RATE_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_requests", "Requests answered", ["route", "model", "status"], registry=r
        )
        self.errors = Counter(
            "cortex_request_errors",
            "Requests answered with an error",
            ["route", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Request duration (to the last byte)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Time to the first upstream chunk",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "cortex_tokens", "Tokens, from the usage neurons report", ["direction"], registry=r
        )
        self.tokens_per_second = Histogram(
            "cortex_completion_tokens_per_second",
            "Completion tokens per second per request",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.cold_loads = Counter(
            "cortex_cold_loads", "Loads started by the gateway", ["node", "outcome"], registry=r
        )
        self.cold_load_duration = Histogram(
            "cortex_cold_load_duration_seconds",
            "Duration of loads started by the gateway",
            ["node"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "cortex_evictions", "Models unloaded by the gateway", ["node", "reason"], registry=r
        )
        self.defrags = Counter(
            "cortex_defrags", "Allocator memory releases asked of a neuron", ["node"], registry=r
        )
        self.node_up = Gauge("cortex_node_up", "1 when the neuron is up", ["node"], registry=r)
        self.in_flight = Gauge(
            "cortex_in_flight", "Requests being proxied now", ["node"], registry=r
        )
