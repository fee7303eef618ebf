"""Benchmark 3: request-to-first-token for a cold model, through the gateway vs. a direct load.

Direct: ``POST /models/load`` on the neuron, then a streamed request; the clock runs from the load
request to the first content chunk. Through the gateway: one streamed request for a model that is
not loaded anywhere (the gateway places it, asks the neuron to load, waits, proxies). After each
run the model is unloaded and the gateway's poller must see it gone before the next run. Runs
alternate; the very first load in a fresh neuron (library imports) is reported on its own.

Run: ``python -m benchmarks.cold_start [--quick]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import fmt, median, python_server, save, table
from cortex.demo.models import harness_installed

PROMPT = [{"role": "user", "content": "hello"}]
ECHO = "bench/echo"
TINY = "bench/tiny-llama"


def first_chunk_seconds(url: str, model: str, started: float) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    return time.perf_counter() - started
    raise RuntimeError(f"{model}: no content in the stream")


def direct(neuron: str, model: str) -> float:
    started = time.perf_counter()
    httpx.post(f"{neuron}/models/load", json={"model_id": model}, timeout=300).raise_for_status()
    return first_chunk_seconds(neuron, model, started)


def via_gateway(gateway: str, model: str) -> float:
    return first_chunk_seconds(gateway, model, time.perf_counter())


def unload(neuron: str, gateway: str, model: str) -> None:
    httpx.post(f"{neuron}/models/unload", json={"model_id": model}, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        data = httpx.get(f"{gateway}/v1/models", timeout=10).json()["data"]
        entry = next((e for e in data if e["id"].endswith(model)), None)
        if entry is None or not entry["loaded_on"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the gateway still lists {model} as loaded")


def run(quick: bool) -> dict[str, Any]:
    from cortex.testing.registry import publish_repo, start_registry

    rounds = 1 if quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    publish_repo(tmp / "repos", ECHO, {"echo.json": json.dumps({"reply": "hi there"})})
    models = [ECHO]
    if harness_installed("torch") and not quick:
        from cortex.testing.tiny_models import build_tiny_model

        publish_repo(tmp / "repos", TINY, build_tiny_model(tmp / "tiny"))
        models.append(TINY)
    registry = start_registry(tmp / "repos")
    (tmp / "neuron.toml").write_text(
        f'name = "n"\n[sources.huggingface]\nendpoint = "{registry.url}"\n'
        f'auth_env = "BENCH_NO_TOKEN"\ncache_dir = "{tmp / "cache"}"\n'
    )
    profiles = "".join(f'[[models]]\nid = "{m}"\n\n' for m in models)
    (tmp / "models.toml").write_text(profiles)
    env = {"CUDA_VISIBLE_DEVICES": "", "BENCH_NO_TOKEN": ""}
    neuron = python_server(
        "cortex.cli",
        "neuron",
        "run",
        "-c",
        str(tmp / "neuron.toml"),
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        env=env,
    ).start(timeout=120)
    assert neuron.url is not None
    (tmp / "cortex.toml").write_text(
        'models_config = "models.toml"\n[gateway]\npoll_interval = "0.2s"\n'
        f'[[neurons]]\nname = "n"\nendpoint = "{neuron.url}"\n'
    )
    gateway = python_server(
        "cortex.cli",
        "cortex",
        "serve",
        "-c",
        str(tmp / "cortex.toml"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        env=env,
    ).start(timeout=60)
    assert gateway.url is not None
    results: dict[str, Any] = {}
    try:
        time.sleep(0.5)
        for model in models:
            first_ever = direct(neuron.url, model)
            unload(neuron.url, gateway.url, model)
            direct_runs, gateway_runs = [], []
            for _ in range(rounds):
                direct_runs.append(direct(neuron.url, model))
                unload(neuron.url, gateway.url, model)
                gateway_runs.append(via_gateway(gateway.url, model))
                unload(neuron.url, gateway.url, model)
            d, g = median(direct_runs), median(gateway_runs)
            results[model] = {
                "first_load_in_fresh_neuron_s": first_ever,
                "direct_s": d,
                "gateway_s": g,
                "gateway_added_ms": (g - d) * 1000,
                "ratio": g / d,
                "direct_runs": direct_runs,
                "gateway_runs": gateway_runs,
            }
    finally:
        gateway.terminate()
        neuron.terminate()
        registry.stop()
    report = {"settings": {"rounds": rounds}, "results": results}
    save("cold_start", report)
    print()
    print(f"cold start: request to first token (median of {rounds} alternating runs)")
    rows = [
        [
            model,
            fmt(r["first_load_in_fresh_neuron_s"] * 1000, 0),
            fmt(r["direct_s"] * 1000, 0),
            fmt(r["gateway_s"] * 1000, 0),
            fmt(r["gateway_added_ms"], 0),
            fmt(r["ratio"], 2),
        ]
        for model, r in results.items()
    ]
    headers = ["model", "first ever ms", "direct ms", "gateway ms", "added ms", "ratio"]
    print(table(headers, rows))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
