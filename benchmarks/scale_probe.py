"""The gateway side of the scale benchmark, in its own process (so its RSS is its own).

Starts a real gateway (the same ``create_app`` ``cortex serve`` runs) in front of ``--nodes``
simulated neurons, stops its background poller, and measures in its own event loop: the time and
CPU of a full poll cycle, of building the ``/v1/models`` catalogue, and of a routing decision.
It prints ``RESULT {json}``, restarts the poller and serves HTTP (``listening on ...``) so the
parent can measure ``/v1/models`` over the wire and read the process's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psutil
import uvicorn

from cortex.config import CortexConfig, Duration, GatewaySection, ModelsConfig, NeuronRef
from cortex.gateway.app import create_app
from cortex.gateway.router import resolve
from cortex.gateway.service import Gateway, load_strategy


def _timed(samples: list[float], cpu: list[float], wall0: float, cpu0: float) -> None:
    samples.append(time.perf_counter() - wall0)
    cpu.append(time.process_time() - cpu0)


async def measure(gateway: Gateway, nodes: int, cycles: int) -> dict[str, float]:
    await gateway.fleet.stop()
    poll_wall: list[float] = []
    poll_cpu: list[float] = []
    for _ in range(cycles):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await gateway.fleet.poll_all()
        _timed(poll_wall, poll_cpu, wall0, cpu0)
    up = sum(1 for n in gateway.nodes() if n.up)
    cat_wall: list[float] = []
    cat_cpu: list[float] = []
    entries = 0
    for _ in range(cycles):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        body = json.dumps({"object": "list", "data": gateway.catalogue()})
        _timed(cat_wall, cat_cpu, wall0, cpu0)
        entries = body.count('"object": "model"')
    # Routing: the shared model (on every node: least-busy over all replicas) and a model held
    # by the last node only (found by scanning).
    route_us: dict[str, float] = {}
    for label, model in (("shared", "bench/fake"), ("last_node", f"bench/n{nodes - 1}-m1")):
        decisions = 200
        wall0 = time.perf_counter()
        for _ in range(decisions):
            resolved = resolve(model, gateway.models, gateway.default_source)
            lease = await gateway.scheduler.acquire(resolved, queued=False)
            lease.release()
        route_us[label] = (time.perf_counter() - wall0) / decisions * 1e6
    gateway.fleet.start()
    return {
        "nodes_up": up,
        "catalogue_entries": entries,
        "poll_cycle_ms": sorted(poll_wall)[len(poll_wall) // 2] * 1000,
        "poll_cycle_cpu_ms": sorted(poll_cpu)[len(poll_cpu) // 2] * 1000,
        "catalogue_ms": sorted(cat_wall)[len(cat_wall) // 2] * 1000,
        "catalogue_cpu_ms": sorted(cat_cpu)[len(cat_cpu) // 2] * 1000,
        "route_shared_us": route_us["shared"],
        "route_last_node_us": route_us["last_node"],
        "rss_after_polls_mb": psutil.Process().memory_info().rss / 2**20,
    }


async def main_async(fake: str, nodes: int, cycles: int) -> None:
    baseline = psutil.Process().memory_info().rss / 2**20
    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(2.0), listen="127.0.0.1:0"),
        neurons=[NeuronRef(f"n{i}", f"{fake}/n{i}") for i in range(nodes)],
    )
    gateway = Gateway(config, ModelsConfig(), load_strategy("lru"))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gateway), host="127.0.0.1", port=0, log_level="warning", access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.01)
    result = await measure(gateway, nodes, cycles)
    result["rss_baseline_mb"] = baseline
    print("RESULT " + json.dumps(result), flush=True)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake", required=True, help="URL of benchmarks.fake_neuron")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main_async(args.fake, args.nodes, args.cycles))


if __name__ == "__main__":
    main()
