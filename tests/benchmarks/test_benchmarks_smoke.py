"""Each benchmark script in a tiny configuration (``--quick``): it runs, its variants answer
without errors, and the figures it records are real measurements (positive, finite).

The full runs are ``make bench`` (docs/benchmarks.md), too slow for ``make test``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("psutil", reason="benchmarks need the bench extra: pip install -e '.[bench]'")


def run_benchmark(tmp_path: Path, module: str, *args: str, timeout: int = 240) -> dict[str, Any]:
    env = {**os.environ, "CORTEX_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return json.loads((tmp_path / f"{module}.json").read_text())


def positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_gateway_overhead_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "gateway_overhead", "--no-litellm", "--no-echo")
    results = report["results"]
    assert {"direct", "cortex"} <= set(results)
    for name, r in results.items():
        assert r["errors"] == 0, name
        assert positive(r["rps_c64"]) and positive(r["p50_ms_c1"]), name
        assert r["stream_chunks"] >= 3 * 256, name  # every chunk of every stream arrived
    assert positive(results["cortex"]["cpu_per_chunk_us"])
    assert positive(results["cortex"]["cpu_per_request_ms_c64"])
    assert "added_p50_ms" in report["derived"]["cortex"]
    assert report["unavailable"]["litellm"].startswith("skipped")
    assert "nginx" in results or "nginx" in report["unavailable"]
    expected = "wrk" if shutil.which("wrk") else "python (aiohttp; wrk is not installed)"
    assert report["settings"]["load_generator"] == expected


def test_key_overhead_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "key_overhead")
    results = report["results"]
    assert set(results) == {"no keys", "keys", "keys+limits"}
    for name, r in results.items():  # the key is accepted, its limits never refuse
        assert r["errors_c1"] == 0 and r["errors_c64"] == 0, name
        assert positive(r["cpu_us_c1"]) and positive(r["cpu_us_c64"]), name
    assert set(report["derived"]) == {"keys", "keys+limits"}
    assert positive(report["code_path_us"]["lookup+limits"])


def test_python_load_generator_counts_requests_and_errors(tmp_path: Path) -> None:
    """The fallback used where wrk is missing: real requests against the fake upstream."""
    from benchmarks.common import python_load, python_server

    fake = python_server("benchmarks.fake_neuron", "--listen", "127.0.0.1:0").start()
    try:
        assert fake.url is not None
        ok = python_load(f"{fake.url}/v1/chat/completions", "m", 4, 0.5, None)
        missing = python_load(f"{fake.url}/nowhere", "m", 2, 0.3, None)
    finally:
        fake.terminate()
    assert ok.requests > 0 and ok.errors == 0 and positive(ok.p50_ms)
    assert missing.requests > 0 and missing.errors == missing.requests


@pytest.mark.slow
def test_harness_overhead_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "harness_overhead", timeout=400)
    transformers = report["results"]["transformers"]
    assert positive(transformers["raw_tokens_per_s"])
    assert positive(transformers["neuron_tokens_per_s"])
    assert len(transformers["neuron_runs"]) == report["settings"]["rounds"]


def test_concurrency_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "concurrency", timeout=600)
    results = report["results"]
    assert "transformers" in results
    for label, result in results.items():
        rows = result["streams"]
        assert set(rows) == {"1", "2", "4"}, label
        for streams, r in rows.items():
            assert r["requests"] == int(streams), (label, streams)  # every stream completed
            for key in ("tokens_per_s", "raw_tokens_per_s", "ttft_p50_ms"):
                assert positive(r[key]), (label, streams, key)
            # a fast model's tokens can all arrive in one write: gaps of 0 are real
            assert math.isfinite(r["itl_p99_ms"]) and r["itl_p99_ms"] >= 0
        turns = result["multi_turn"]
        assert turns["prompt_tokens"] >= 300
        assert positive(turns["ttft_cached_ms"]) and positive(turns["ttft_uncached_ms"])


def test_structured_output_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "structured_output", timeout=300)
    for label, r in report["results"].items():
        assert positive(r["free_us_per_token"]) and positive(r["constrained_us_per_token"]), label
        assert all(n > 1 for n in r["constrained_tokens"]), label


def test_cold_start_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "cold_start", timeout=400)
    echo = report["results"]["bench/echo"]
    assert positive(echo["direct_s"]) and positive(echo["gateway_s"])
    if "fetch" not in report:  # no torch harness installed: the echo rows only
        return
    for repo in ("bench/sharded", "bench/single"):
        fetched = report["fetch"][repo]
        assert fetched["bytes"] > 16 * 2**20
        for variant, row in fetched["variants"].items():
            assert positive(row["mb_per_s"]), (repo, variant)
        assert positive(fetched["pull_vs_curl"])
    harness = report["load"]["bench/sharded"]["modes"]["harness"]
    assert positive(harness["load_s"]) and positive(harness["peak_over_kept"])
    split = report["cold_split"]
    for key in ("empty_cache_s", "cached_s", "loaded_s"):
        assert positive(split[key]), key


def test_scale_quick(tmp_path: Path) -> None:
    report = run_benchmark(tmp_path, "scale")
    results = report["results"]
    assert set(results) == {"10"}
    r = results["10"]
    assert r["nodes_up"] == 10
    assert r["catalogue_entries"] == 1 + 10 * 3  # the shared model + three per node
    for key in ("poll_cycle_ms", "models_http_p50_ms", "route_shared_us", "rss_mb"):
        assert positive(r[key]), key


def test_plots_from_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = run_benchmark(tmp_path, "scale")
    assert report["results"]
    env = {**os.environ, "CORTEX_BENCH_RESULTS": str(tmp_path)}
    code = (
        "import sys; from pathlib import Path; from benchmarks.plots import plot_all; "
        "print([p.name for p in plot_all(Path(sys.argv[1]))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    png = tmp_path / "bench-scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
