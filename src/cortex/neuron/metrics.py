"""Prometheus metrics of one neuron, in a registry of its own (so tests can run several apps
in one process). The same family as the gateway's ``cortex_*`` metrics under ``neuron_``, plus
what only a node knows: device memory, device queue depth, poisoned devices, model states.
Names, labels and buckets: docs/operators.md. Labels are bounded (route templates, devices,
models loaded on this node, a few outcomes); model loads carry no model label, because a load
that fails can name anything."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cortex.metric_buckets import LATENCY_BUCKETS, LOAD_BUCKETS, RATE_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class NeuronMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "neuron_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "neuron_request_duration_seconds",
            "HTTP request duration by route, to the last byte (streams included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "neuron_prompt_tokens", "Prompt tokens of generations", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "neuron_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "neuron_time_to_first_token_seconds",
            "From request to the first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "neuron_tokens_per_second",
            "Decode rate of finished generations (tokens after the first / time since it)",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "neuron_generations",
            "Finished generations by how they ended (stop, length, cancelled, error)",
            ["model", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "neuron_inflight_requests", "Generation requests in flight", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "neuron_queue_depth",
            "Jobs queued or running on a device worker",
            ["device"],
            registry=r,
        )
        self.device_memory = Gauge(
            "neuron_device_memory_bytes",
            "Device memory: total (budget), used by models, free",
            ["device", "kind"],
            registry=r,
        )
        self.device_poisoned = Gauge(
            "neuron_device_poisoned", "1 when the device worker is poisoned", ["device"], registry=r
        )
        self.loads = Counter(
            "neuron_model_loads", "Model loads by outcome (ok, failed)", ["outcome"], registry=r
        )
        self.load_duration = Histogram(
            "neuron_model_load_duration_seconds",
            "Duration of successful model loads (preflight + fetch + load)",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter("neuron_model_unloads", "Model unloads", registry=r)
        self.models = Gauge("neuron_models", "Models on this node by state", ["state"], registry=r)
        # the device schedulers (docs/neuron.md#the-scheduler)
        self.running = Gauge(
            "neuron_running_generations",
            "Generations in a model's running batch",
            ["model"],
            registry=r,
        )
        self.waiting = Gauge(
            "neuron_waiting_generations",
            "Generations waiting for a place in a model's batch (max_batch or KV cache full)",
            ["model"],
            registry=r,
        )
        self.kv_tokens = Gauge(
            "neuron_kv_tokens",
            "A batched model's KV cache: capacity (tokens) and reserved by running generations",
            ["model", "kind"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "neuron_batch_rows",
            "Generations stepped together in one scheduler step of a model",
            ["device"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._scheduled_models: set[str] = set()

    def refresh_schedulers(self, loads: dict[str, Any]) -> None:
        """Set the scheduler gauges of the models loaded now (``model id -> ModelLoad``) and
        drop the series of models that are gone."""
        for model, load in loads.items():
            self.running.labels(model).set(load.running)
            self.waiting.labels(model).set(load.waiting)
            if load.kv_tokens is not None:
                self.kv_tokens.labels(model, "capacity").set(load.kv_tokens)
                self.kv_tokens.labels(model, "reserved").set(load.kv_tokens_reserved)
        for model in self._scheduled_models - set(loads):
            for gauge in (self.running, self.waiting):
                gauge.remove(model)
            for kind in ("capacity", "reserved"):
                with contextlib.suppress(KeyError):  # a model that never batched has none
                    self.kv_tokens.remove(model, kind)
        self._scheduled_models = set(loads)

    def series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised per label set (``labels()`` validates and
        looks its arguments up on every call: ~1-2 us, several times per request). Label sets
        are bounded (routes, statuses, models loaded here); no series is ever removed."""
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
