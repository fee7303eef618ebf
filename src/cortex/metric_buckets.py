"""Histogram buckets shared by the gateway's and the neurons' metrics (docs/operators.md).

Chosen for LLM work, where one histogram must hold a cached two-token answer (milliseconds) and
a long generation or a first fetch of a large model (many minutes): Prometheus' default buckets
stop at 10 s and would put every long request in ``+Inf``.
"""

from __future__ import annotations

# Request durations and time to first token.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800,
)  # fmt: skip
# Model loads: a small model from the page cache in a second, a 70B model from a registry in tens
# of minutes.
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Time spent waiting for an admission slot (bounded by queue_timeout).
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The gateway's own work per request: well under a millisecond when healthy.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)  # fmt: skip
# Decode rates (tokens/s), from a CPU-offloaded 70B model to a small model on a big GPU.
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
