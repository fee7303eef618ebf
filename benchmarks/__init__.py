"""cortex benchmarks (``make bench``, ``python -m benchmarks``): docs/benchmarks.md.

Each benchmark runs its variants side by side in one run on one machine and reports ratios and
CPU per request or per chunk, the figures that carry over between machines best.
"""
