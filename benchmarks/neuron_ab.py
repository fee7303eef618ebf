"""A/B of the neuron itself: the harness-overhead models streamed alternately from two
``neuron run`` processes, one running the code of another checkout (``--baseline DIR``, e.g. a
``git worktree`` of an older commit), one running this checkout. Both share the machine at the
same moment, so a change to the neuron's per-token path is measured side by side.

Run::

    git worktree add --detach /tmp/neuron-base <commit>
    python -m benchmarks.neuron_ab --baseline /tmp/neuron-base [--rounds 15] [--tokens 128] \
        [--size tiny|small]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx

from benchmarks.common import python_server
from benchmarks.harness_overhead import (
    GGUF_MODEL,
    SMALL_GGUF_MODEL,
    SMALL_TORCH_MODEL,
    TORCH_MODEL,
    build,
    neuron_stream,
)
from cortex.demo.models import harness_installed
from cortex.testing.servers import ProcessServer


def start_neuron(label: str, tmp: Path, registry_url: str, pythonpath: str | None) -> ProcessServer:
    config = tmp / f"{label}.toml"
    config.write_text(
        f'name = "{label}"\n[sources.huggingface]\nendpoint = "{registry_url}"\n'
        f'auth_env = "BENCH_NO_TOKEN"\ncache_dir = "{tmp / ("cache-" + label)}"\n'
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "BENCH_NO_TOKEN": ""}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return python_server(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0",
        "--log-level", "warning", env=env,
    ).start(timeout=120)  # fmt: skip


def main() -> None:
    from cortex.testing.registry import start_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--size", choices=("tiny", "small"), default="tiny", help="the harness benchmark's model"
    )
    args = parser.parse_args()
    base = args.baseline.resolve()
    base_path = ":".join(
        str(base / p)
        for p in ("src", "plugins/harness_torch/src", "plugins/harness_llamacpp/src", ".")
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-neuron-ab-"))
    small = args.size == "small"
    build(tmp, small=small)
    registry = start_registry(tmp / "repos")
    servers = {
        "baseline": start_neuron("baseline", tmp, registry.url, base_path),
        "current": start_neuron("current", tmp, registry.url, None),
    }
    torch_id, gguf_id = (
        (SMALL_TORCH_MODEL, SMALL_GGUF_MODEL) if small else (TORCH_MODEL, GGUF_MODEL)
    )
    models = [torch_id] + ([gguf_id] if harness_installed("llamacpp") else [])
    try:
        for model in models:
            rates: dict[str, list[float]] = {label: [] for label in servers}
            produced: dict[str, set[int]] = {label: set() for label in servers}
            for server in servers.values():
                load = {"model_id": model, "context_length": 256}
                httpx.post(f"{server.url}/models/load", json=load, timeout=300).raise_for_status()
                neuron_stream(server.url, model, 8)  # warm up
            for _ in range(args.rounds):
                for label, server in servers.items():
                    seconds, tokens = neuron_stream(server.url, model, args.tokens)
                    rates[label].append(tokens / seconds)
                    produced[label].add(tokens)
            for label, runs in rates.items():
                best, middle = max(runs), statistics.median(runs)
                print(
                    f"{model:24s} {label:8s} best {best:7.0f} tok/s ({1e6 / best:6.0f} us/token)"
                    f"  median {middle:7.0f} tok/s  tokens {sorted(produced[label])}"
                )
            for server in servers.values():
                httpx.post(f"{server.url}/models/unload", json={"model_id": model}, timeout=60)
    finally:
        for server in servers.values():
            server.terminate()
        registry.stop()


if __name__ == "__main__":
    main()
