"""Benchmark 3: cold start -- fetch, load, and request to first token for a model nobody loaded.

1. **Fetch.** A 1 GB repo in 4 shards and a 1 GB single-file repo (random float32 Llama weights
   plus config and tokenizer), served by ``cortex registry serve`` in its own process, fetched
   into an empty cache by: curl (one process, the files one after another, into files; and into
   /dev/null: the wire alone), bare ``hf_hub_download`` (one call per file in a child process,
   timed inside it) and ``neuron pull`` (the CLI, timed as a whole and by the fetch it reports;
   and with ``CORTEX_FETCH_CONNECTIONS=1``). The clients the fetch was chosen from are compared
   on their own by ``benchmarks.fetch_clients``.
   The variants take turns within each round (the first one rotates); medians and min-max.
2. **Load.** The cached models loaded on CPU in a fresh child process each (imports warmed by a
   tiny load first; the files are in the page cache, having just been fetched): the torch
   harness, transformers' own ``from_pretrained`` at the CPU dtype followed by ``.to()`` (what
   the harness did before), reading the safetensors (``load_file``, which maps them) and
   reading their bytes (``read()``). Each touches every weight page once, as a first forward
   pass would. Wall time, and peak RSS (the kernel's
   ``ru_maxrss``) against the RSS the loaded model keeps, both above the RSS before the load.
3. **Cold request to first token through the gateway, split.** The sharded model with an empty
   cache (fetch + load + first token), then cached but not loaded (load + first token), then
   loaded (first token): fetch = first - second, load = second - third.
4. **Direct vs gateway** (the echo model and a tiny Llama): ``POST /models/load`` on the neuron
   then a streamed request, against one streamed request through the gateway for a model not
   loaded anywhere; the very first load in a fresh neuron (library imports) on its own.

``--quick``: 16 MB models, one round, the load variants of the sharded model only.

Run: ``python -m benchmarks.cold_start [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, fmt, median, python_server, save, table
from cortex.demo.models import harness_installed

PROMPT = [{"role": "user", "content": "hello"}]
ECHO = "bench/echo"
TINY = "bench/tiny-llama"
SHARDED = "bench/sharded"
SINGLE = "bench/single"
SINGLE_BF16 = "bench/single-bf16"
GB = 1 << 30
MB = 1 << 20
PYTHON = sys.executable
CHILD_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "BENCH_NO_TOKEN": "",
    "PYTHONPATH": str(ROOT.parent),
}


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **CHILD_ENV, **extra}


# ---- models ----------------------------------------------------------------------------------


def build_models(repos: Path, total: int, quick: bool) -> dict[str, Path]:
    """The fetch/load repos (sized Llama models) and the tiny one, published under ``repos``."""
    from cortex.testing.registry import publish_repo
    from cortex.testing.sized_models import build_sized_model, layer_params
    from cortex.testing.tiny_models import build_tiny_model

    work = repos.parent / "models"
    tiny = build_tiny_model(work / "tiny")
    per_layer = layer_params() * 4
    built = {
        SHARDED: build_sized_model(
            work / "sharded", total, "float32", total // 4 + per_layer, tokenizer_dir=tiny
        ),
        SINGLE: build_sized_model(work / "single", total, "float32", None, tokenizer_dir=tiny),
    }
    if not quick:  # a bf16 checkpoint the CPU loads as float32: the load must convert
        built[SINGLE_BF16] = build_sized_model(  # 0.5 GB file, 1 GB in memory
            work / "single-bf16", total // 2, "bfloat16", None, tokenizer_dir=tiny
        )
    for repo_id, folder in built.items():
        publish_repo(repos, repo_id, folder)
    publish_repo(repos, TINY, tiny)
    return {**built, TINY: tiny}


def repo_files(registry: str, repo_id: str) -> list[tuple[str, int]]:
    info = httpx.get(f"{registry}/api/models/{repo_id}", timeout=600).json()
    return [(s["rfilename"], s["size"]) for s in info["siblings"]]


# ---- 1. fetch --------------------------------------------------------------------------------

HF_CHILD = r"""
import sys, time
from huggingface_hub import hf_hub_download
endpoint, repo, cache = sys.argv[1:4]
started = time.perf_counter()
for name in sys.argv[4:]:
    hf_hub_download(repo, name, endpoint=endpoint, cache_dir=cache, token=False)
print(time.perf_counter() - started)
"""


def fetch_once(variant: str, registry: str, repo_id: str, files: list[str], work: Path) -> float:
    """Seconds one variant takes to bring ``files`` of ``repo_id`` into an empty ``work``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    urls = [f"{registry}/{repo_id}/resolve/main/{name}" for name in files]
    try:
        if variant.startswith("curl"):
            sink = variant == "curl to /dev/null"
            args = ["curl", "-s", "--fail"]
            for i, url in enumerate(urls):
                args += ["-o", "/dev/null" if sink else str(work / f"f{i}"), url]
            started = time.perf_counter()
            subprocess.run(args, check=True)
            return time.perf_counter() - started
        if variant == "hf_hub_download":
            out = subprocess.run(
                [PYTHON, "-c", HF_CHILD, registry, repo_id, str(work / "cache"), *files],
                check=True,
                capture_output=True,
                text=True,
                env=child_env(),
            )
            return float(out.stdout.strip().splitlines()[-1])
        config = work / "neuron.toml"
        config.write_text(
            f'[sources.huggingface]\nendpoint = "{registry}"\nauth_env = "BENCH_NO_TOKEN"\n'
            f'cache_dir = "{work / "cache"}"\n'
        )
        one = {"CORTEX_FETCH_CONNECTIONS": "1"} if "1 connection" in variant else {}
        started = time.perf_counter()
        out = subprocess.run(
            [PYTHON, "-m", "cortex.cli", "neuron", "pull", repo_id, "-c", str(config), "--json"],
            check=True,
            capture_output=True,
            text=True,
            env=child_env(**one),
            cwd=str(ROOT.parent),
        )
        wall = time.perf_counter() - started
        pulled = json.loads(out.stdout)
        if variant == "neuron pull (CLI wall)":
            return wall
        return float(pulled["fetch_seconds"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


FETCHERS = (
    "curl to files",
    "curl to /dev/null",
    "hf_hub_download",
    "neuron pull (fetch)",
    "neuron pull (CLI wall)",
    "neuron pull (fetch, 1 connection)",
)


def bench_fetch(
    registry: str, repos: list[str], rounds: int, tmp: Path, quick: bool
) -> dict[str, Any]:
    fetchers = FETCHERS[:-1] if quick else FETCHERS
    results: dict[str, Any] = {}
    files = {repo: repo_files(registry, repo) for repo in repos}  # also hashes them, once
    runs: dict[tuple[str, str], list[float]] = {}
    for round_ in range(rounds):
        for repo in repos:
            names = [name for name, _ in files[repo]]
            order = fetchers[round_ % len(fetchers) :] + fetchers[: round_ % len(fetchers)]
            for variant in order:
                seconds = fetch_once(variant, registry, repo, names, tmp / "fetch")
                runs.setdefault((repo, variant), []).append(seconds)
    for repo in repos:
        size = sum(s for _, s in files[repo])
        entry: dict[str, Any] = {"bytes": size, "files": len(files[repo]), "variants": {}}
        for variant in fetchers:
            seconds = runs[(repo, variant)]
            entry["variants"][variant] = {
                "runs_s": seconds,
                "median_s": median(seconds),
                "min_s": min(seconds),
                "max_s": max(seconds),
                "mb_per_s": size / MB / median(seconds),
            }
        curl = entry["variants"]["curl to files"]["mb_per_s"]
        entry["pull_vs_curl"] = entry["variants"]["neuron pull (fetch)"]["mb_per_s"] / curl
        entry["hf_hub_vs_curl"] = entry["variants"]["hf_hub_download"]["mb_per_s"] / curl
        results[repo] = entry
    return results


# ---- 2. load ---------------------------------------------------------------------------------

LOAD_CHILD = r"""
import json, re, sys, time
from pathlib import Path
import psutil, torch
mode, snapshot, tiny = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
proc = psutil.Process()

def reset_peak():  # start the kernel's peak-RSS count (VmHWM) afresh
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

def touch(tensors):
    with torch.no_grad():
        return sum(float(t.reshape(-1)[:: 4096 // t.element_size()].float().sum()) for t in tensors)

if mode == "read bytes":
    def load(path):
        data = [f.read_bytes() for f in sorted(Path(path).glob("*.safetensors"))]
        return data, lambda: [torch.frombuffer(bytearray(1), dtype=torch.uint8)]
elif mode == "read":
    from safetensors.torch import load_file
    def load(path):
        tensors = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(f))
        return tensors, lambda: list(tensors.values())
elif mode == "harness":
    from cortex.devices import cpu_device
    from cortex.harness import LoadOptions
    from cortex_harness_torch.harness import TorchHarness
    def load(path):
        model = TorchHarness().load(path, cpu_device(), LoadOptions())
        return model, lambda: list(model.model.parameters())
else:  # what the harness did before: from_pretrained at the CPU dtype, then .to(device)
    from transformers import AutoModelForCausalLM
    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.to("cpu")
        return model, lambda: list(model.parameters())

warm, tensors = load(tiny)
touch(tensors())
del warm, tensors
base = proc.memory_info().rss
reset_peak()
started = time.perf_counter()
loaded, tensors = load(snapshot)
loaded_s = time.perf_counter() - started
touch(tensors())
touched_s = time.perf_counter() - started
peak = max(peak_rss(), base)
after = proc.memory_info().rss
print(json.dumps({"load_s": loaded_s, "load_and_touch_s": touched_s,
                  "peak_mb": (peak - base) / 2**20, "kept_mb": (after - base) / 2**20}))
"""

LOADERS = ("harness", "transformers", "read", "read bytes")


def bench_load(models: dict[str, Path], tiny: Path, rounds: int, quick: bool) -> dict[str, Any]:
    chosen = [SHARDED] if quick else [m for m in (SHARDED, SINGLE, SINGLE_BF16) if m in models]
    modes = ("harness", "read") if quick else LOADERS
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(rounds):
        for model in chosen:
            order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
            for mode in order:
                out = subprocess.run(
                    [PYTHON, "-c", LOAD_CHILD, mode, str(models[model]), str(tiny)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=child_env(CORTEX_TORCH_CPU_THREADS="1"),
                )
                runs.setdefault((model, mode), []).append(json.loads(out.stdout.splitlines()[-1]))
    results: dict[str, Any] = {}
    for model in chosen:
        weights = sum(f.stat().st_size for f in models[model].glob("*.safetensors"))
        entry: dict[str, Any] = {"weights_mb": weights / MB, "modes": {}}
        for mode in modes:
            measured = runs[(model, mode)]
            row: dict[str, Any] = {"runs": measured}
            for key in ("load_s", "load_and_touch_s", "peak_mb", "kept_mb"):
                values = [r[key] for r in measured]
                row[key] = median(values)
                row[f"{key}_range"] = [min(values), max(values)]
            row["peak_over_kept"] = median([r["peak_mb"] / r["kept_mb"] for r in measured])
            entry["modes"][mode] = row
        harness = entry["modes"]["harness"]["load_and_touch_s"]
        entry["harness_vs_read"] = harness / entry["modes"]["read"]["load_and_touch_s"]
        if "read bytes" in entry["modes"]:
            entry["harness_vs_read_bytes"] = (
                harness / entry["modes"]["read bytes"]["load_and_touch_s"]
            )
        results[model] = entry
    return results


# ---- 3 and 4. through the gateway --------------------------------------------------------------


def first_chunk_seconds(url: str, model: str, started: float) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    return time.perf_counter() - started
    raise RuntimeError(f"{model}: no content in the stream")


def direct(neuron: str, model: str) -> float:
    started = time.perf_counter()
    httpx.post(f"{neuron}/models/load", json={"model_id": model}, timeout=600).raise_for_status()
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


def bench_split(neuron: str, gateway: str, model: str, cache: Path, rounds: int) -> dict[str, Any]:
    """Empty cache, cached, loaded: three requests through the gateway per round."""
    folder = cache / ("models--" + model.replace("/", "--"))
    shutil.rmtree(folder, ignore_errors=True)
    first_ever = via_gateway(gateway, model)  # pays the imports of the first torch load
    unload(neuron, gateway, model)
    runs = []
    for _ in range(rounds):
        shutil.rmtree(folder, ignore_errors=True)
        empty = via_gateway(gateway, model)
        unload(neuron, gateway, model)
        cached = via_gateway(gateway, model)
        warm = via_gateway(gateway, model)
        unload(neuron, gateway, model)
        runs.append({"empty_cache_s": empty, "cached_s": cached, "loaded_s": warm})
    result: dict[str, Any] = {"model": model, "first_in_fresh_neuron_s": first_ever, "runs": runs}
    for key in ("empty_cache_s", "cached_s", "loaded_s"):
        result[key] = median([r[key] for r in runs])
    result["fetch_s"] = median([r["empty_cache_s"] - r["cached_s"] for r in runs])
    result["load_s"] = median([r["cached_s"] - r["loaded_s"] for r in runs])
    result["first_token_s"] = result["loaded_s"]
    return result


def start_fleet(tmp: Path, registry: str, models: list[str]) -> tuple[Any, Any]:
    (tmp / "neuron.toml").write_text(
        f'name = "n"\n[sources.huggingface]\nendpoint = "{registry}"\n'
        f'auth_env = "BENCH_NO_TOKEN"\ncache_dir = "{tmp / "cache"}"\n'
    )
    (tmp / "models.toml").write_text("".join(f'[[models]]\nid = "{m}"\n\n' for m in models))
    env = {"CUDA_VISIBLE_DEVICES": "", "BENCH_NO_TOKEN": ""}
    neuron = python_server(
        "cortex.cli", "neuron", "run", "-c", str(tmp / "neuron.toml"),
        "--listen", "127.0.0.1:0", "--log-level", "warning", env=env,
    ).start(timeout=120)  # fmt: skip
    assert neuron.url is not None
    (tmp / "cortex.toml").write_text(
        'models_config = "models.toml"\n[gateway]\npoll_interval = "0.2s"\n'
        f'[[neurons]]\nname = "n"\nendpoint = "{neuron.url}"\n'
    )
    try:
        gateway = python_server(
            "cortex.cli", "cortex", "serve", "-c", str(tmp / "cortex.toml"),
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--log-level", "warning", env=env,
        ).start(timeout=60)  # fmt: skip
    except BaseException:
        neuron.terminate()
        raise
    assert gateway.url is not None
    return neuron, gateway


def bench_direct_vs_gateway(
    neuron: str, gateway: str, models: list[str], rounds: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model in models:
        first_ever = direct(neuron, model)
        unload(neuron, gateway, model)
        direct_runs, gateway_runs = [], []
        for _ in range(rounds):
            direct_runs.append(direct(neuron, model))
            unload(neuron, gateway, model)
            gateway_runs.append(via_gateway(gateway, model))
            unload(neuron, gateway, model)
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
    return results


# ---- the run ---------------------------------------------------------------------------------


def run(quick: bool, rounds: int | None = None) -> dict[str, Any]:
    from cortex.testing.registry import publish_repo

    rounds = rounds or (1 if quick else 5)
    total = 16 * MB if quick else GB
    torch = harness_installed("torch")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    repos = tmp / "repos"
    publish_repo(repos, ECHO, {"echo.json": json.dumps({"reply": "hi there"})})
    models = build_models(repos, total, quick) if torch else {}
    registry = python_server(
        "cortex.cli", "cortex", "registry", "serve", str(repos),
        "--listen", "127.0.0.1:0", "--log-level", "warning",
    ).start(timeout=60)  # fmt: skip
    assert registry.url is not None
    for repo_id in [ECHO, *models]:  # the registry hashes each file once: not while measured
        repo_files(registry.url, repo_id)
    report: dict[str, Any] = {
        "settings": {"rounds": rounds, "model_bytes": total, "quick": quick},
        "results": {},
    }
    try:
        if torch:
            report["fetch"] = bench_fetch(registry.url, [SHARDED, SINGLE], rounds, tmp, quick)
            report["load"] = bench_load(models, models[TINY], rounds, quick)
        profiles = [ECHO, *([TINY, SHARDED] if torch else [])]
        neuron, gateway = start_fleet(tmp, registry.url, profiles)
        try:
            time.sleep(0.5)
            report["results"] = bench_direct_vs_gateway(
                neuron.url, gateway.url, [ECHO, *([TINY] if torch else [])], rounds
            )
            if torch:
                report["cold_split"] = bench_split(
                    neuron.url, gateway.url, SHARDED, tmp / "cache", rounds
                )
        finally:
            gateway.terminate()
            neuron.terminate()
    finally:
        registry.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    save("cold_start", report)
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    rounds = report["settings"]["rounds"]
    if "fetch" in report:
        print(f"\nfetch into an empty cache (median of {rounds}; min-max)")
        rows = []
        for repo, entry in report["fetch"].items():
            for variant, r in entry["variants"].items():
                rows.append(
                    [
                        f"{repo} ({entry['bytes'] / MB:.0f} MB, {entry['files']} files)",
                        variant,
                        fmt(r["median_s"], 2),
                        f"{r['min_s']:.2f}-{r['max_s']:.2f}",
                        fmt(r["mb_per_s"], 0),
                    ]
                )
        print(table(["repo", "client", "s", "range s", "MB/s"], rows))
        for repo, entry in report["fetch"].items():
            print(
                f"{repo}: neuron pull {entry['pull_vs_curl']:.0%} of curl's throughput, "
                f"hf_hub_download {entry['hf_hub_vs_curl']:.0%}"
            )
    if "load" in report:
        print(f"\nload of a cached model on CPU (median of {rounds} child processes)")
        rows = []
        for model, entry in report["load"].items():
            for mode, r in entry["modes"].items():
                rows.append(
                    [
                        f"{model} ({entry['weights_mb']:.0f} MB)",
                        mode,
                        fmt(r["load_s"], 2),
                        fmt(r["load_and_touch_s"], 2),
                        fmt(r["peak_mb"], 0),
                        fmt(r["kept_mb"], 0),
                        fmt(r["peak_over_kept"], 2),
                    ]
                )
        headers = ["model", "loader", "load s", "+touch s", "peak MB", "kept MB", "peak/kept"]
        print(table(headers, rows))
        for model, entry in report["load"].items():
            bytes_read = entry.get("harness_vs_read_bytes")
            print(
                f"{model}: harness (load + touch) {entry['harness_vs_read']:.1f}x load_file "
                + (f", {bytes_read:.2f}x read()" if bytes_read else "")
            )
    if "cold_split" in report:
        s = report["cold_split"]
        print(f"\ncold request to first token through the gateway, {s['model']} (median)")
        print(
            f"empty cache {s['empty_cache_s']:.2f} s = fetch {s['fetch_s']:.2f} + load "
            f"{s['load_s']:.2f} + first token {s['first_token_s']:.3f} "
            f"(first in a fresh neuron: {s['first_in_fresh_neuron_s']:.2f} s)"
        )
        for key in ("empty_cache_s", "cached_s", "loaded_s"):
            values = [r[key] for r in s["runs"]]
            print(f"  {key}: {' '.join(f'{v:.2f}' for v in values)}")
    print(f"\ndirect load vs one request through the gateway (median of {rounds})")
    rows = [
        [
            model,
            fmt(r["first_load_in_fresh_neuron_s"] * 1000, 0),
            fmt(r["direct_s"] * 1000, 0),
            fmt(r["gateway_s"] * 1000, 0),
            fmt(r["gateway_added_ms"], 0),
            fmt(r["ratio"], 2),
        ]
        for model, r in report["results"].items()
    ]
    headers = ["model", "first ever ms", "direct ms", "gateway ms", "added ms", "ratio"]
    print(table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    args = parser.parse_args()
    run(args.quick, args.rounds)


if __name__ == "__main__":
    main()
