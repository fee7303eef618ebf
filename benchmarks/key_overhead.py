"""Benchmark 8: what named keys, usage accounting and per-key limits add to a request.

Three ``cortex serve`` processes side by side in front of one upstream that answers at once (the
fake OpenAI server of :mod:`benchmarks.fake_neuron`):

- ``no keys``: auth off (the gateway as before issue 23: no lookup, no accounting);
- ``keys``: a key file with one named key without limits, usage in SQLite (the key lookup, the
  per-key metrics, the usage row and its batched write);
- ``keys+limits``: the same key with ``models``, ``rpm``, ``tpm`` and a daily token budget, all
  far above what the run uses (every check runs, none refuses).

Plain (non-streamed) requests through ``wrk`` at concurrency 1 and 64, in 2-second slices that
take turns across the variants, three rounds; each variant's CPU per request (its process tree,
read from ``/proc/PID/task/*/schedstat``) is the best of the three rounds, and "added" is that
minus the ``no keys`` variant's. Target: under 50 µs of CPU per request.

On a shared 2-core machine one round's CPU per request moves by +-40 µs, as much as the target,
so the script also times the added code path itself in-process (:func:`code_path`): the key
lookup, the model check, the rate and budget check with its headers, the charge, the usage row
and the per-key metrics, per request, against the lookup of a gateway without keys.

Run: ``python -m benchmarks.key_overhead [--quick] [--no-pin]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import proxies
from benchmarks.common import (
    LoadResult,
    cpu_layout,
    fmt,
    load_generator,
    pin_tree,
    python_server,
    run_wrk,
    save,
    table,
)
from cortex.auth import hash_key
from cortex.testing.servers import ProcessServer

MODEL = "bench/fake"
KEY = "ck-bench-key-overhead"
TARGET_US = 50.0
LEVELS = (1, 64)
VARIANTS = {
    "no keys": None,
    "keys": "bench",
    "keys+limits": (
        f"bench models={MODEL} rpm=100000000 tpm=1000000000 budget_tokens=1000000000 per=day"
    ),
}


def start_gateway(name: str, upstream: str, key_line: str | None) -> proxies.Proxy:
    """``cortex serve`` in a folder of its own, with a ``cortex.toml`` naming the key file and
    the SQLite usage store when ``key_line`` is given (auth off otherwise)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    config = ""
    if key_line is not None:
        (folder / "keys.txt").write_text(f"{hash_key(KEY)} {key_line}\n")
        config = (
            '[auth]\nkeys_file = "keys.txt"\n'
            '[usage]\nstore = "sqlite"\npath = "usage.db"\nflush_interval = "1s"\n'
        )
    (folder / "cortex.toml").write_text(config)
    server = ProcessServer(
        [
            sys.executable,
            "-m",
            "cortex.cli",
            "cortex",
            "serve",
            "-c",
            str(folder / "cortex.toml"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--neuron",
            f"up={upstream}",
            "--log-level",
            "warning",
        ],
        cwd=str(folder),
    ).start()
    assert server.url is not None and server.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health", timeout=5).json()
        if health.get("nodes_up") == 1 and health.get("models_ready", 0) >= 1:
            break
        time.sleep(0.1)
    else:
        server.terminate()
        raise RuntimeError(f"{name}: cortex did not see the upstream: {health}")
    return proxies.Proxy(name, server.url, server.proc.pid, server.terminate)


def code_path(iterations: int = 20000) -> dict[str, float]:
    """CPU µs per request of what keys add, timed in-process (best of 5 runs): ``lookup`` (a
    named key without limits: who it is, its usage row, its metrics) and ``lookup+limits``
    (every check as in ``keys+limits``), minus the auth-off lookup."""
    from cortex.auth import GatewayAuth, KeySet
    from cortex.gateway.accounting import Accounting
    from cortex.gateway.limits import Limits
    from cortex.gateway.metrics import GatewayMetrics
    from cortex.keyfile import ApiKey, KeyLimits

    path = "/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    limited = KeyLimits((MODEL,), 10**8, 10**9, 10**9, "day")
    out: dict[str, float] = {}
    for name, limits in (("lookup", KeyLimits()), ("lookup+limits", limited)):
        key = ApiKey("bench", limits)
        auth = GatewayAuth(KeySet.from_named({KEY: key}), KeySet(), True)
        checks = Limits({"bench": key})
        metrics = GatewayMetrics()
        accounting = Accounting(None, checks, metrics)

        one = _request(auth, checks, accounting, metrics, headers)
        out[name] = _best_us(one, iterations)
    off = GatewayAuth(KeySet(), KeySet(), False)
    base = _best_us(lambda: off.authenticate(path, headers), iterations)
    return {name: round(us - base, 2) for name, us in out.items()} | {"auth_off": round(base, 2)}


def _request(auth: Any, checks: Any, accounting: Any, metrics: Any, headers: Any) -> Any:
    """What one request with a key does in addition (see :func:`code_path`)."""
    from cortex.keyfile import ApiKey

    def one() -> None:
        who = auth.authenticate("/v1/chat/completions", headers)
        assert isinstance(who, ApiKey)
        state = checks.state(who)
        if who.limits.models:
            checks.check_model(state, MODEL, MODEL, "hf", lambda n: n)
        if who.limits.limited:
            checks.admit(state, False)
        state.charge(6, time.monotonic())
        accounting.record(state.name, MODEL, 5, 1, 0.001, False)
        series = metrics.key_series(state.name, MODEL)
        series.ok.inc()
        series.prompt_tokens.inc(5)
        series.completion_tokens.inc(1)

    return one


def _best_us(step: Any, iterations: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(iterations):
            step()
        best = min(best, (time.process_time() - started) / iterations * 1e6)
    return best


def run(quick: bool, pin: bool = True, rounds: int = 3) -> dict[str, Any]:
    seconds = 1.0 if quick else 2.0
    rounds = 1 if quick else rounds
    layout = cpu_layout() if pin else None
    load_at_start = os.getloadavg()
    fake = python_server("benchmarks.fake_neuron", "--listen", "127.0.0.1:0").start()
    assert fake.url is not None and fake.proc is not None
    if layout is not None:
        pin_tree(os.getpid(), layout[1])
        pin_tree(fake.proc.pid, layout[1])
    running: list[proxies.Proxy] = []
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        for name, line in VARIANTS.items():
            running.append(start_gateway(name, fake.url, line))
        if layout is not None:
            for proxy in running:
                assert proxy.pid is not None
                pin_tree(proxy.pid, layout[0])
        for proxy in running:  # warm up: connections, lazy imports, the metric series
            print(f"  warming up {proxy.name} ...", flush=True)
            run_wrk(f"{proxy.base_url}/v1/chat/completions", MODEL, 4, 2.0, None, KEY)
        for round_no in range(rounds):
            for level in LEVELS:
                print(f"  round {round_no + 1}, concurrency {level} ...", flush=True)
                for proxy in running:
                    result = run_wrk(
                        f"{proxy.base_url}/v1/chat/completions",
                        MODEL,
                        level,
                        seconds,
                        proxy.pid,
                        KEY,
                    )
                    runs.setdefault((proxy.name, level), []).append(result)
                    time.sleep(0.25)  # wrk leaves requests in flight: let them end
    finally:
        for proxy in reversed(running):
            proxy.stop()
        fake.terminate()
    results: dict[str, dict[str, Any]] = {}
    for (name, level), slices in runs.items():
        entry = results.setdefault(name, {})
        cpu_us = [r.cpu_per_request_ms * 1000 for r in slices]
        entry[f"cpu_us_c{level}"] = min(cpu_us)
        entry[f"cpu_us_c{level}_rounds"] = cpu_us
        entry[f"rps_c{level}"] = max(r.rps for r in slices)
        entry[f"p50_ms_c{level}"] = min(r.p50_ms for r in slices)
        entry[f"errors_c{level}"] = sum(r.errors for r in slices)
    base = results["no keys"]
    derived = {
        name: {f"added_cpu_us_c{lv}": r[f"cpu_us_c{lv}"] - base[f"cpu_us_c{lv}"] for lv in LEVELS}
        for name, r in results.items()
        if name != "no keys"
    }
    print("  the added code path, in-process ...", flush=True)
    in_process = code_path(2000 if quick else 20000)
    report = {
        "settings": {
            "seconds_per_slice": seconds,
            "rounds": rounds,
            "load_generator": load_generator(),
            "loadavg_at_start": [round(x, 2) for x in load_at_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpu_layout": (
                {"proxy": sorted(layout[0]), "load_and_upstream": sorted(layout[1])}
                if layout is not None
                else "unpinned"
            ),
        },
        "results": results,
        "derived": derived,
        "code_path_us": in_process,
        "target_added_cpu_us": TARGET_US,
    }
    save("key_overhead", report)
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    results, derived = report["results"], report["derived"]
    rows = []
    for name, r in results.items():
        d = derived.get(name, {})
        rows.append(
            [
                name,
                fmt(r["cpu_us_c1"], 1),
                fmt(d.get("added_cpu_us_c1", float("nan")), 1),
                fmt(r["cpu_us_c64"], 1),
                fmt(d.get("added_cpu_us_c64", float("nan")), 1),
                fmt(r["p50_ms_c1"], 3),
                fmt(r["rps_c64"], 0),
                r["errors_c1"] + r["errors_c64"],
            ]
        )
    settings = report["settings"]
    print()
    print(
        f"per-key overhead (best of {settings['rounds']} rounds; load average "
        f"{settings['loadavg_at_start']} at start, {settings['loadavg_at_end']} at end)"
    )
    headers = [
        "variant",
        "cpu/req us @1",
        "added @1",
        "cpu/req us @64",
        "added @64",
        "p50 ms @1",
        "rps @64",
        "errors",
    ]
    print(table(headers, rows))
    worst = max(max(d.values()) for d in derived.values())
    verdict = "met" if worst < TARGET_US else "MISSED"
    print(f"end to end: target < {TARGET_US:g} us CPU added: {verdict} (worst {worst:.1f} us)")
    code = report["code_path_us"]
    print(
        f"the added code path, in-process: {code['lookup']:.1f} us (a named key), "
        f"{code['lookup+limits']:.1f} us (with every limit); auth off: {code['auth_off']:.2f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="see benchmarks.gateway_overhead")
    args = parser.parse_args()
    run(args.quick, pin=not args.no_pin, rounds=args.rounds)


if __name__ == "__main__":
    main()
