"""Benchmark 4: the gateway in front of 10, 100 and 500 simulated neurons.

Each simulated neuron (:mod:`benchmarks.fake_neuron`, all in one light process under path
prefixes) holds 4 models: one shared by every node, three of its own. For each fleet size, a
fresh gateway process (:mod:`benchmarks.scale_probe`) reports the poll-cycle time and CPU, the
``/v1/models`` build time, and the routing-decision time; this script adds ``/v1/models`` latency
over HTTP and the gateway's memory. Growth should be linear in nodes x models or better.

Run: ``python -m benchmarks.scale [--quick] [--sizes 10,100,500]``
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from benchmarks.common import fmt, median, percentile, python_server, rss_bytes, save, table

MODELS_PER_NODE = 4


def measure_size(nodes: int, requests: int) -> dict[str, Any]:
    fake = python_server(
        "benchmarks.fake_neuron",
        "--listen",
        "127.0.0.1:0",
        "--nodes",
        str(nodes),
        "--models",
        str(MODELS_PER_NODE),
    ).start()
    assert fake.url is not None
    probe = python_server("benchmarks.scale_probe", "--fake", fake.url, "--nodes", str(nodes))
    try:
        probe.start(timeout=300)
        assert probe.url is not None and probe.proc is not None
        line = next(x for x in probe.text.splitlines() if x.startswith("RESULT "))
        result: dict[str, Any] = json.loads(line[len("RESULT ") :])
        latencies = []
        with httpx.Client(timeout=30) as client:
            client.get(f"{probe.url}/v1/models")
            for _ in range(requests):
                started = time.perf_counter()
                answer = client.get(f"{probe.url}/v1/models")
                latencies.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
        result["models_http_p50_ms"] = median(latencies)
        result["models_http_p99_ms"] = percentile(latencies, 99)
        result["rss_mb"] = rss_bytes(probe.proc.pid) / 2**20
        return result
    finally:
        probe.terminate()
        fake.terminate()


def run(quick: bool, sizes: list[int]) -> dict[str, Any]:
    if quick:
        sizes = [s for s in sizes if s <= 20] or [5, 10]
    requests = 5 if quick else 30
    results = {}
    for nodes in sizes:
        print(f"  {nodes} simulated neurons ...", flush=True)
        results[str(nodes)] = measure_size(nodes, requests)
    report = {"settings": {"models_per_node": MODELS_PER_NODE, "sizes": sizes}, "results": results}
    save("scale", report)
    print()
    print(f"scale: gateway in front of N simulated neurons ({MODELS_PER_NODE} models each)")
    rows = [
        [
            n,
            r["nodes_up"],
            fmt(r["poll_cycle_ms"], 1),
            fmt(r["poll_cycle_cpu_ms"], 1),
            fmt(r["catalogue_ms"], 2),
            fmt(r["models_http_p50_ms"], 1),
            fmt(r["route_shared_us"], 0),
            fmt(r["route_last_node_us"], 0),
            fmt(r["rss_mb"], 0),
        ]
        for n, r in results.items()
    ]
    headers = [
        "nodes",
        "up",
        "poll cycle ms",
        "poll CPU ms",
        "catalogue ms",
        "/v1/models p50 ms",
        "route shared us",
        "route last us",
        "RSS MB",
    ]
    print(table(headers, rows))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="10,100,500")
    args = parser.parse_args()
    run(args.quick, [int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
