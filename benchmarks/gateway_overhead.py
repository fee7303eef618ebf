"""Benchmark 1: what a proxy adds in front of an upstream that answers instantly.

Variants side by side in one run, against one upstream (the bare fake OpenAI server of
:mod:`benchmarks.fake_neuron`): (a) the upstream directly, (b) cortex, (c) LiteLLM's proxy,
(d) nginx (the floor). And, to separate gateway cost from neuron cost, an ``echo`` model on a real
``neuron run`` directly and through cortex. Plain requests: ``wrk`` (p50/p99 at concurrency 1,
requests/s at 16 and 64); streams: a light asyncio client (time to first chunk and total time of
a 256-chunk stream). CPU is the proxy process tree's, per request and per chunk.

Run: ``python -m benchmarks.gateway_overhead [--quick] [--no-litellm] [--no-echo]
[--baseline DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import proxies
from benchmarks.common import (
    LoadResult,
    StreamResult,
    StreamTarget,
    combine_slices,
    cpu_layout,
    fmt,
    load_generator,
    median,
    pin_tree,
    python_server,
    run_streams_interleaved,
    run_wrk,
    save,
    table,
)
from cortex.testing.servers import ProcessServer

MODEL = "bench/fake"
ECHO_MODEL = "bench/echo"
SLICE_GAP_S = 0.25  # between two wrk slices: see measure_load
STREAM_CHUNKS = 256
BASELINE = "cortex baseline"
TARGETS = {
    "added_p50_ms": 1.0,
    "rps_at_64": 1000.0,
    "cpu_per_chunk_us": 30.0,
    "added_stream_ms": 3.0,
}


def start_echo_neuron(tmp: Path) -> tuple[ProcessServer, Any]:
    """A real ``neuron run`` with an instant echo model (256+ words) loaded from a registry."""
    from cortex.testing.registry import publish_repo, start_registry

    words = " ".join(f"w{i}" for i in range(STREAM_CHUNKS + 8))
    publish_repo(
        tmp / "repos", ECHO_MODEL, {"echo.json": json.dumps({"reply": words, "memory_mb": 10})}
    )
    registry = start_registry(tmp / "repos")
    config = tmp / "neuron.toml"
    config.write_text(
        f'name = "echo"\n[sources.huggingface]\nendpoint = "{registry.url}"\n'
        f'auth_env = "BENCH_NO_TOKEN"\ncache_dir = "{tmp / "cache"}"\n'
    )
    neuron = python_server(
        "cortex.cli",
        "neuron",
        "run",
        "-c",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        env={"CUDA_VISIBLE_DEVICES": "", "BENCH_NO_TOKEN": ""},
    ).start()
    answer = httpx.post(f"{neuron.url}/models/load", json={"model_id": ECHO_MODEL}, timeout=120)
    answer.raise_for_status()
    return neuron, registry


def _model(proxy: proxies.Proxy) -> str:
    return ECHO_MODEL if proxy.name.startswith("echo") else MODEL


def _url(proxy: proxies.Proxy) -> str:
    return f"{proxy.base_url}/v1/chat/completions"


def measure_load(running: list[proxies.Proxy], seconds: float) -> dict[str, dict[str, Any]]:
    """Plain requests at concurrency 1, 16 and 64, in 1-second slices that take turns across
    the variants (``seconds`` slices each), so background load is shared out evenly."""
    for proxy in running:
        # Warm up: connections, caches, lazy imports (LiteLLM answers its first requests slowly).
        print(f"  warming up {proxy.name} ...", flush=True)
        run_wrk(_url(proxy), _model(proxy), 4, max(2.0, seconds), None, proxy.key)
    slices = max(1, round(seconds))
    by_level: dict[int, dict[str, LoadResult]] = {}
    for concurrency in (1, 16, 64):
        print(f"  concurrency {concurrency}, {slices} slices per variant in turn ...", flush=True)
        runs: dict[str, list[LoadResult]] = {p.name: [] for p in running}
        for _ in range(slices):
            for proxy in running:
                runs[proxy.name].append(
                    run_wrk(_url(proxy), _model(proxy), concurrency, 1.0, proxy.pid, proxy.key)
                )
                # wrk exits with up to `concurrency` requests in flight, which the upstream
                # still counts until it sees them gone; two echo-neuron variants in a row would
                # otherwise start 64 new connections against 64 abandoned requests and hear
                # 503 queue_full at max_queue = 64 (0 of 12 runs a second apart, 3 of 12 back
                # to back).
                time.sleep(SLICE_GAP_S)
        by_level[concurrency] = {name: combine_slices(r) for name, r in runs.items()}
    results: dict[str, dict[str, Any]] = {}
    for proxy in running:
        c1, c16, c64 = (by_level[c][proxy.name] for c in (1, 16, 64))
        results[proxy.name] = {
            "p50_ms_c1": c1.p50_ms,
            "p99_ms_c1": c1.p99_ms,
            "rps_c1": c1.rps,
            "rps_c16": c16.rps,
            "rps_c64": c64.rps,
            "errors": c1.errors + c16.errors + c64.errors,
            "cpu_per_request_ms_c1": c1.cpu_per_request_ms,
            "cpu_per_request_ms_c64": c64.cpu_per_request_ms,
        }
    return results


def stream_figures(stream: StreamResult) -> dict[str, Any]:
    return {
        "stream_ttft_ms": median(stream.ttft_ms),
        "stream_total_ms": median(stream.total_ms),
        "stream_totals_ms": stream.total_ms,
        "stream_chunks": stream.chunks,
        "cpu_per_chunk_us": stream.cpu_per_chunk_us,
    }


def _started(name: str, start: Any, unavailable: dict[str, str]) -> proxies.Proxy | None:
    try:
        return start()
    except proxies.Unavailable as exc:
        unavailable[name] = str(exc)
        print(f"  {name}: unavailable: {exc}")
        return None


def run(
    quick: bool,
    with_litellm: bool,
    with_echo: bool,
    fast_stack: str | None = None,
    baseline: str | None = None,
    pin: bool = True,
) -> dict[str, Any]:
    seconds = 1.0 if quick else 5.0
    streams = 3 if quick else 60
    layout = cpu_layout() if pin else None
    fake = python_server("benchmarks.fake_neuron", "--listen", "127.0.0.1:0").start()
    assert fake.url is not None and fake.proc is not None
    if layout is not None:  # this process (the load generators) and the upstream share the rest
        pin_tree(os.getpid(), layout[1])
        pin_tree(fake.proc.pid, layout[1])
    unavailable: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    running: list[proxies.Proxy] = []
    cleanup: list[Any] = [fake.terminate]
    try:
        starters = [
            ("direct", lambda: proxies.direct(fake.url, None)),
            ("cortex", lambda: proxies.cortex(fake.url)),
            ("nginx", lambda: proxies.nginx(fake.url)),
        ]
        if fast_stack:
            name = "cortex+httptools"
            starters.insert(2, (name, lambda: proxies.cortex(fake.url, name, fast_stack)))
        if baseline:  # another cortex tree (e.g. the previous commit's) side by side
            starters.insert(2, (BASELINE, lambda: proxies.cortex(fake.url, BASELINE, baseline)))
        if with_litellm:
            starters.append(("litellm", lambda: proxies.litellm(fake.url)))
        else:
            unavailable["litellm"] = "skipped (--no-litellm)"
        for name, start in starters:
            proxy = _started(name, start, unavailable)
            if proxy is not None:
                running.append(proxy)
                cleanup.append(proxy.stop)
        if with_echo:
            tmp = Path(tempfile.mkdtemp(prefix="bench-echo-"))
            neuron, registry = start_echo_neuron(tmp)
            cleanup += [neuron.terminate, registry.stop]
            assert neuron.url is not None and neuron.proc is not None
            if layout is not None:  # the echo neuron is an upstream too
                pin_tree(neuron.proc.pid, layout[1])
            running.append(proxies.Proxy("echo-neuron direct", neuron.url, None, lambda: None))
            via = proxies.cortex(neuron.url, name="echo-neuron via cortex")
            running.append(via)
            cleanup.append(via.stop)
            if baseline:
                name = f"echo-neuron via {BASELINE}"
                via_base = proxies.cortex(neuron.url, name=name, pythonpath=baseline)
                running.append(via_base)
                cleanup.append(via_base.stop)
        if layout is not None:
            for proxy in running:
                if proxy.pid is not None:
                    pin_tree(proxy.pid, layout[0])
        results = measure_load(running, seconds)
        print("  streaming, one stream per variant in turn ...", flush=True)
        targets = [StreamTarget(p.name, _url(p), _model(p), p.pid, p.key) for p in running]
        for name, stream in run_streams_interleaved(targets, STREAM_CHUNKS, streams).items():
            results[name].update(stream_figures(stream))
    finally:
        for stop in reversed(cleanup):
            stop()
    report = {
        "settings": {
            "seconds": seconds,
            "streams": streams,
            "chunks": STREAM_CHUNKS,
            "load_generator": load_generator(),
            "cpu_layout": (
                {"proxy": sorted(layout[0]), "load_and_upstream": sorted(layout[1])}
                if layout is not None
                else "unpinned"
            ),
        },
        "results": results,
        "unavailable": unavailable,
        "derived": derive(results),
        "targets": TARGETS,
    }
    save("gateway_overhead", report)
    print_report(report)
    return report


def derive(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Added latency and stream time against the upstream each variant sits in front of."""
    derived: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        base = results.get("echo-neuron direct" if name.startswith("echo") else "direct")
        if base is None or name in ("direct", "echo-neuron direct"):
            continue
        derived[name] = {
            "added_p50_ms": r["p50_ms_c1"] - base["p50_ms_c1"],
            "added_p99_ms": r["p99_ms_c1"] - base["p99_ms_c1"],
            # the median of per-round differences (streams were interleaved, see common.py)
            "added_stream_ms": median(
                [
                    a - b
                    for a, b in zip(r["stream_totals_ms"], base["stream_totals_ms"], strict=True)
                ]
            ),
            "added_ttft_ms": r["stream_ttft_ms"] - base["stream_ttft_ms"],
        }
    if "cortex" in results and results.get("litellm", {}).get("rps_c64"):
        derived["cortex"]["rps_c64_vs_litellm"] = (
            results["cortex"]["rps_c64"] / results["litellm"]["rps_c64"]
        )
    return derived


def print_report(report: dict[str, Any]) -> None:
    results, derived = report["results"], report["derived"]
    rows = []
    for name, r in results.items():
        d = derived.get(name, {})
        rows.append(
            [
                name,
                fmt(r["p50_ms_c1"]),
                fmt(r["p99_ms_c1"]),
                fmt(d.get("added_p50_ms", float("nan"))),
                fmt(r["rps_c16"], 0),
                fmt(r["rps_c64"], 0),
                fmt(r["cpu_per_request_ms_c64"], 3),
                fmt(r["stream_ttft_ms"]),
                fmt(r["stream_total_ms"]),
                fmt(d.get("added_stream_ms", float("nan"))),
                fmt(r["cpu_per_chunk_us"], 1),
                r["errors"],
            ]
        )
    print()
    generator = report["settings"]["load_generator"]
    print(f"gateway overhead (one worker each; upstream answers instantly; load: {generator})")
    headers = [
        "variant",
        "p50 ms",
        "p99 ms",
        "added p50",
        "rps@16",
        "rps@64",
        "cpu/req ms",
        "ttft ms",
        f"{STREAM_CHUNKS}-chunk ms",
        "added ms",
        "cpu/chunk us",
        "errors",
    ]
    print(table(headers, rows))
    for name, why in report["unavailable"].items():
        print(f"{name}: {why}")
    if "cortex" in results:
        c, d = results["cortex"], derived.get("cortex", {})
        checks = [
            ("added p50 < 1 ms", d.get("added_p50_ms", 99) < TARGETS["added_p50_ms"]),
            (">= 1,000 req/s at 64", c["rps_c64"] >= TARGETS["rps_at_64"]),
            ("< 30 us CPU per chunk", c["cpu_per_chunk_us"] < TARGETS["cpu_per_chunk_us"]),
            ("< 3 ms added to a 256-chunk stream", d.get("added_stream_ms", 99) < 3),
        ]
        print(
            "cortex targets: " + "; ".join(f"{t}: {'met' if ok else 'MISSED'}" for t, ok in checks)
        )
        if "rps_c64_vs_litellm" in d:
            print(f"cortex vs LiteLLM at concurrency 64: {d['rps_c64_vs_litellm']:.1f}x requests/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, for a smoke test")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-echo", action="store_true")
    parser.add_argument(
        "--fast-stack",
        metavar="DIR",
        help="also run cortex with DIR on PYTHONPATH (pip install --target DIR httptools uvloop)",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the cortex package found in DIR (PYTHONPATH), e.g. the previous commit's:"
        " git archive HEAD src/cortex | tar -x -C DIR (then move DIR/src/cortex to DIR/cortex)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let every process run on every core (default: the proxy under test gets the last"
        " core to itself, the load generator and the upstream share the others)",
    )
    args = parser.parse_args()
    run(
        args.quick,
        not args.no_litellm,
        not args.no_echo,
        args.fast_stack,
        args.baseline,
        pin=not args.no_pin,
    )


if __name__ == "__main__":
    main()
