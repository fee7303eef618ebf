"""``python -m benchmarks [--quick] [--only NAME,...] [--no-litellm]`` (``make bench``).

Runs the benchmarks one after the other (never two at once: they share the machine), writes
``benchmarks/results/*.json`` and, when matplotlib is installed, one PNG per benchmark in docs/
(with ``--quick``, next to the results instead).
"""

from __future__ import annotations

import argparse
import importlib.util

from benchmarks import (
    cold_start,
    concurrency,
    gateway_overhead,
    harness_overhead,
    key_overhead,
    scale,
    structured_output,
)

NAMES = (
    "gateway_overhead",
    "harness_overhead",
    "concurrency",
    "structured_output",
    "cold_start",
    "scale",
    "key_overhead",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (a smoke run)")
    parser.add_argument("--only", default=",".join(NAMES), help="comma-separated benchmark names")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM variant")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--fast-stack", metavar="DIR", help="see benchmarks.gateway_overhead")
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))} (known: {NAMES})")
    for name in chosen:
        print(f"== {name}", flush=True)
        if name == "gateway_overhead":
            gateway_overhead.run(args.quick, not args.no_litellm, True, args.fast_stack)
        elif name == "harness_overhead":
            harness_overhead.run(args.quick)
        elif name == "concurrency":
            concurrency.run(args.quick)
        elif name == "structured_output":
            structured_output.run(args.quick)
        elif name == "cold_start":
            cold_start.run(args.quick)
        elif name == "scale":
            scale.run(args.quick, [10, 100, 500])
        elif name == "key_overhead":
            key_overhead.run(args.quick)
    if args.no_plots:
        return
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return
    from benchmarks.common import RESULTS
    from benchmarks.plots import plot_all

    # A smoke run's plots go next to its results: docs/ keeps the plots of measured runs.
    for path in plot_all(RESULTS) if args.quick else plot_all():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
