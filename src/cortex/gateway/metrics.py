"""Prometheus metrics of the gateway, on a registry of its own (served on ``metrics_listen``).

Names, labels and buckets are documented in docs/operators.md and used by
docs/grafana-dashboard.json (a test checks that every name the dashboard uses is exposed).

Label values are bounded, so no client can blow up cardinality: routes are the gateway's own
(anything else is ``other``), models are canonical ids the gateway knows (models.toml, aliases,
models loaded on a neuron) or ``other``, nodes are the configured neuron names or ``none``
(answered before a node was picked), status is ``ok`` or ``error``, error codes are short
identifiers or ``other``.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cortex.metric_buckets import (
    LATENCY_BUCKETS,
    LOAD_BUCKETS,
    OVERHEAD_BUCKETS,
    QUEUE_BUCKETS,
    RATE_BUCKETS,
)

OTHER = "other"
NO_NODE = "none"
KNOWN_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    }
)
# Why the gateway unloaded a model (the loader's reasons mapped to the documented three).
EVICTION_REASONS = {"make_room": "memory", "keep_alive": "keep_alive", "admin": "manual"}
_CODE = re.compile(r"[a-z0-9_]{1,48}")


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else OTHER


def code_label(code: str) -> str:
    return code if _CODE.fullmatch(code) else OTHER


def eviction_reason(reason: str) -> str:
    return EVICTION_REASONS.get(reason, reason if reason in EVICTION_REASONS.values() else OTHER)


@attrs.frozen
class RequestSeries:
    """The labelled series one proxied request touches, for one (route, model, node).

    Why: prometheus_client's ``labels()`` validates, stringifies and takes a lock on every
    call, and a request made about ten such calls. Label values are bounded (module docstring),
    so the series are looked up once per combination and kept."""

    duration: Any
    ok: Any
    error: Any
    ttft: Any
    tokens_per_second: Any
    prompt_tokens: Any
    completion_tokens: Any
    in_flight: Any


@attrs.frozen
class KeySeries:
    """The labelled series of one (key, model)."""

    ok: Any
    error: Any
    prompt_tokens: Any
    completion_tokens: Any


class GatewayMetrics:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], RequestSeries] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_requests",
            "Requests answered, by route, model, node and status (ok or error)",
            ["route", "model", "node", "status"],
            registry=r,
        )
        self.errors = Counter(
            "cortex_request_errors",
            "Requests answered with an error, by route and error code",
            ["route", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Request duration, from the parsed request to the last byte of the answer",
            ["route", "model", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Streamed answers: from the parsed request to the first chunk carrying content "
            "(text, reasoning or a tool call), queueing and cold loads included",
            ["route", "model", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second",
            "Streamed answers: decode rate, completion tokens after the first / time since it",
            ["model", "node"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cortex_prompt_tokens",
            "Prompt tokens, from the usage neurons report",
            ["model", "node"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "cortex_completion_tokens",
            "Completion tokens, from the usage neurons report",
            ["model", "node"],
            registry=r,
        )
        self.cold_loads = Counter(
            "cortex_cold_loads",
            "Loads started by the gateway, by outcome (ok, failed)",
            ["model", "node", "outcome"],
            registry=r,
        )
        self.load_duration = Histogram(
            "cortex_model_load_duration_seconds",
            "Duration of loads started by the gateway (fetch included when files were not cached)",
            ["model", "node"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "cortex_evictions",
            "Models unloaded by the gateway, by reason (memory, keep_alive, manual)",
            ["model", "node", "reason"],
            registry=r,
        )
        self.defrags = Counter(
            "cortex_defrags", "Allocator memory releases asked of a neuron", ["node"], registry=r
        )
        self.node_up = Gauge("cortex_node_up", "1 when the neuron is up", ["node"], registry=r)
        self.in_flight = Gauge(
            "cortex_inflight_requests",
            "Requests being proxied to a neuron now",
            ["model", "node"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "cortex_queue_wait_seconds",
            "Time a request waited for an admission slot of its model",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "cortex_gateway_overhead_seconds",
            "The gateway's own time per request before it reaches the neuron (resolve, admit, "
            "route, encode), queue waits and cold loads excluded",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )

        # Per key (docs/security.md): labels are configured key names only, never a key.
        self.key_requests = Counter(
            "cortex_key_requests",
            "Requests by key name, model and status (ok or error); only requests with a key",
            ["key", "model", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "cortex_key_tokens",
            "Tokens by key name, model and kind (prompt or completion)",
            ["key", "model", "kind"],
            registry=r,
        )
        self.key_limited = Counter(
            "cortex_key_limited",
            "Requests refused or cut by a key's limits, by reason (requests_per_minute, "
            "tokens_per_minute, budget, model_not_allowed, budget_cut: a stream ended at the "
            "budget)",
            ["key", "reason"],
            registry=r,
        )
        self.key_budget_remaining = Gauge(
            "cortex_key_budget_remaining_tokens",
            "Tokens left in a key's budget for the current day or month (keys with a budget)",
            ["key"],
            registry=r,
        )
        self.usage_store_errors = Counter(
            "cortex_usage_store_errors",
            "Usage syncs that failed (the store could not be reached or refused the write); "
            "the rows are kept and written by the next sync that works",
            registry=r,
        )
        self.usage_store_up = Gauge(
            "cortex_usage_store_up", "1 when the last usage sync worked", registry=r
        )
        self.usage_pending_rows = Gauge(
            "cortex_usage_pending_rows",
            "Usage rows (hour x key x model) recorded but not written to the store yet",
            registry=r,
        )
        self._key_series: dict[tuple[str, str], KeySeries] = {}

    def key_series(self, key: str, model: str) -> KeySeries:
        """The series of requests of ``key`` on ``model`` (memoised, as :meth:`series`)."""
        found = self._key_series.get((key, model))
        if found is None:
            found = self._key_series[(key, model)] = KeySeries(
                ok=self.key_requests.labels(key, model, "ok"),
                error=self.key_requests.labels(key, model, "error"),
                prompt_tokens=self.key_tokens.labels(key, model, "prompt"),
                completion_tokens=self.key_tokens.labels(key, model, "completion"),
            )
        return found

    def series(self, route: str, model: str, node: str) -> RequestSeries:
        """The series of requests on ``route`` for ``model`` served by ``node`` (memoised)."""
        key = (route, model, node)
        found = self._series.get(key)
        if found is None:
            found = RequestSeries(
                duration=self.duration.labels(route, model, node),
                ok=self.requests.labels(route, model, node, "ok"),
                error=self.requests.labels(route, model, node, "error"),
                ttft=self.ttft.labels(route, model, node),
                tokens_per_second=self.tokens_per_second.labels(model, node),
                prompt_tokens=self.prompt_tokens.labels(model, node),
                completion_tokens=self.completion_tokens.labels(model, node),
                in_flight=self.in_flight.labels(model, node),
            )
            self._series[key] = found
        return found
