"""Prometheus metrics of one neuron, in a registry of its own (so tests can run several apps
in one process). Names start with ``neuron_``; labels are bounded (routes, devices, models
loaded on this node, a few result kinds)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class NeuronMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "neuron_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.tokens = Counter(
            "neuron_tokens", "Tokens processed, by model and kind", ["model", "kind"], registry=r
        )
        self.ttft = Histogram(
            "neuron_time_to_first_token_seconds",
            "From request to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "neuron_tokens_per_second",
            "Decode rate of finished generations (completion tokens / decode time)",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "neuron_generations",
            "Finished generations by how they ended (stop, length, cancelled, error)",
            ["model", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "neuron_in_flight_requests", "Generation requests in flight", ["model"], registry=r
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
            "neuron_model_loads", "Model loads by result (ok, failed)", ["result"], registry=r
        )
        self.load_seconds = Histogram(
            "neuron_model_load_seconds",
            "Duration of successful model loads (preflight + fetch + load)",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter("neuron_model_unloads", "Model unloads", registry=r)
        self.models = Gauge("neuron_models", "Models on this node by state", ["state"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
