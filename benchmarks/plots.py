"""One matplotlib PNG per benchmark, from ``benchmarks/results/*.json``, into ``docs/``.

Run: ``python -m benchmarks.plots`` (``make bench`` does it after the runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import DOCS, RESULTS


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _subtitle(report: dict[str, Any]) -> str:
    m = report["machine"]
    return f"{m['cores']} cores, {m['cpu']}, load avg at start {m['load_average_at_start'][0]}"


def plot_gateway(report: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("p50 latency at concurrency 1 (ms)", "p50_ms_c1"),
        ("requests/s at concurrency 64", "rps_c64"),
        ("proxy CPU per streamed chunk (µs)", "cpu_per_chunk_us"),
    ]
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [results[n][key] for n in names]
        bars = ax.barh(names, values, color="#4c72b0")
        ax.bar_label(bars, fmt="%.2f" if key != "rps_c64" else "%.0f", padding=2, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.suptitle("Gateway overhead (instant upstream, one worker each)\n" + _subtitle(report))
    fig.tight_layout()
    path = out / "bench-gateway-overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_harness(report: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(labels))
    raw = [results[k]["raw_tokens_per_s"] for k in labels]
    neuron = [results[k]["neuron_tokens_per_s"] for k in labels]
    b1 = left.bar([i - 0.2 for i in x], raw, 0.4, label="raw library loop")
    b2 = left.bar([i + 0.2 for i in x], neuron, 0.4, label="neuron run (HTTP stream)")
    left.bar_label(b1, fmt="%.0f", fontsize=8)
    left.bar_label(b2, fmt="%.0f", fontsize=8)
    left.set_yscale("log")
    left.set_xticks(list(x), labels, fontsize=8)
    left.set_ylabel("tokens/s (best run of each, log scale)")
    left.legend(fontsize=8)
    ratios = [results[k]["ratio"] * 100 for k in labels]
    steps = [1e3 / results[k]["raw_tokens_per_s"] for k in labels]
    bars = right.bar(
        list(x), ratios, 0.5, color=["#55a868" if r >= 90 else "#c44e52" for r in ratios]
    )
    texts = [f"{r:.0f}%\n(raw {s:.2f} ms/token)" for r, s in zip(ratios, steps, strict=True)]
    right.bar_label(bars, labels=texts, fontsize=8)
    right.axhline(90, color="black", linestyle="--", linewidth=1, label="target 90%")
    right.set_ylim(0, 125)
    right.set_xticks(list(x), labels, fontsize=8)
    right.set_ylabel("neuron tokens/s, % of the raw loop")
    right.legend(fontsize=8, loc="lower right")
    sizes = report.get("settings", {}).get("sizes", {})
    shapes = "; ".join(f"{k}: {v}" for k, v in sizes.items())
    fig.suptitle(
        "Harness overhead" + (f" ({shapes})" if shapes else "") + "\n" + _subtitle(report),
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "bench-harness-overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cold(report: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(len(labels))
    direct = [results[k]["direct_s"] * 1000 for k in labels]
    gateway = [results[k]["gateway_s"] * 1000 for k in labels]
    b1 = ax.bar([i - 0.2 for i in x], direct, 0.4, label="load on the neuron, then request")
    b2 = ax.bar([i + 0.2 for i in x], gateway, 0.4, label="one request through the gateway")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("request to first token (ms)")
    ax.legend()
    ax.set_title("Cold start\n" + _subtitle(report), fontsize=10)
    fig.tight_layout()
    path = out / "bench-cold-start.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(report: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    results = report["results"]
    nodes = [int(n) for n in results]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = [
        ("poll cycle: gateway CPU (ms)", "poll_cycle_cpu_ms"),
        ("/v1/models over HTTP, p50 (ms)", "models_http_p50_ms"),
        ("routing decision (µs)", "route_shared_us"),
        ("gateway RSS (MB)", "rss_mb"),
    ]
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [results[str(n)][key] for n in nodes]
        ax.plot(nodes, values, marker="o")
        if values and nodes[0] > 0:  # the line a linear growth from the first point would follow
            ax.plot(nodes, [values[0] * n / nodes[0] for n in nodes], ls=":", c="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("simulated neurons")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Scale (dotted: linear growth from the smallest fleet)\n" + _subtitle(report))
    fig.tight_layout()
    path = out / "bench-scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_concurrency(report: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"transformers": "#4c72b0", "llama.cpp": "#dd8452"}
    for label, result in results.items():
        rows = result["streams"]
        streams = sorted(int(s) for s in rows)
        colour = colours.get(label)
        neuron = [rows[str(s)]["tokens_per_s"] for s in streams]
        raw = [rows[str(s)]["raw_tokens_per_s"] for s in streams]
        axes[0].plot(streams, neuron, marker="o", c=colour, label=f"{label}: neuron run")
        axes[0].plot(streams, raw, marker="x", ls=":", c=colour, label=f"{label}: library batched")
        ttft = [rows[str(s)]["ttft_p50_ms"] for s in streams]
        axes[1].plot(streams, ttft, marker="o", c=colour, label=f"{label} p50")
        ttft99 = [rows[str(s)]["ttft_p99_ms"] for s in streams]
        axes[1].plot(streams, ttft99, marker=".", ls="--", c=colour, label=f"{label} p99")
        itl = [rows[str(s)]["itl_p50_ms"] for s in streams]
        axes[2].plot(streams, itl, marker="o", c=colour, label=f"{label} p50")
        itl99 = [rows[str(s)]["itl_p99_ms"] for s in streams]
        axes[2].plot(streams, itl99, marker=".", ls="--", c=colour, label=f"{label} p99")
    titles = (
        "aggregate tokens/s",
        "time to first token (ms)",
        "inter-token latency (ms)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle(
        "Concurrency: continuous batching through neuron run vs the library batched by hand\n"
        + _subtitle(report)
    )
    fig.tight_layout()
    path = out / "bench-concurrency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {
    "gateway_overhead": plot_gateway,
    "concurrency": plot_concurrency,
    "harness_overhead": plot_harness,
    "cold_start": plot_cold,
    "scale": plot_scale,
}


def plot_all(out: Path = DOCS) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, plot in PLOTS.items():
        report = _load(name)
        if report and report.get("results"):
            written.append(plot(report, out))
    return written


def main() -> None:
    for path in plot_all():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
