"""What structured output costs a token: the same generation free and under a JSON Schema.

For the torch harness (llguidance masks each step's logits) and the llama.cpp harness (a GBNF
grammar sampler), on the harness benchmark's "small" model, driven by the neuron's own scheduler
in this process (no HTTP: the difference is the constraint alone). Each round generates one
answer constrained (it ends with its JSON) and one free of as many tokens, alternating; the
figure is the time per decoded token (the first token, which carries the prompt, is measured
apart and left out), best of the rounds, and the difference in microseconds a token.

Run: ``python -m benchmarks.structured_output [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, save, table
from benchmarks.harness_overhead import build_small_model
from cortex.demo.models import harness_installed

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def seconds_for(model: Any, sampling: Any, tokens: int) -> tuple[float, int]:
    """Seconds for one generation of up to ``tokens`` through the scheduler, and tokens made."""
    from cortex.neuron.scheduler import Scheduler
    from cortex.testing.batching import collected, drive, sequence

    model.reset()
    seq = sequence(model, model.render_chat(ASK), tokens, sampling)
    started = time.perf_counter()
    drive(Scheduler(), {0: [seq]})
    return time.perf_counter() - started, len(collected(seq).tokens)


def decode_per_token(model: Any, sampling: Any, tokens: int) -> tuple[float, int]:
    """Seconds a decoded token (the generation less its first token, which carries the
    prompt's evaluation), and tokens made."""
    whole, made = seconds_for(model, sampling, tokens)
    first, _ = seconds_for(model, sampling, 1)
    return (whole - first) / max(1, made - 1), made


def run(quick: bool, rounds: int | None = None) -> dict[str, Any]:
    from cortex.devices import cpu_device
    from cortex.harness import LoadOptions, ResponseFormat, SamplingParams

    rounds = rounds or (2 if quick else 7)
    tokens = 24 if quick else 96
    tmp = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    model_dir = build_small_model(tmp / "small")
    loaded: dict[str, Any] = {}
    from cortex_harness_torch.harness import TorchHarness

    loaded["transformers"] = TorchHarness().load(model_dir, cpu_device(), LoadOptions())
    if harness_installed("llamacpp"):
        from cortex_harness_llamacpp.harness import LlamaCppHarness

        from cortex.testing.tiny_gguf import build_tiny_gguf_repo

        gguf = build_tiny_gguf_repo(tmp / "gguf", quants=("F32",), model_dir=model_dir)
        loaded["llama.cpp"] = LlamaCppHarness().load(gguf, cpu_device(), LoadOptions(quant="F32"))
    free = SamplingParams(temperature=0)
    constrained = SamplingParams(
        temperature=0, response_format=ResponseFormat("json_schema", json.dumps(SCHEMA))
    )
    results: dict[str, Any] = {}
    for label, model in loaded.items():
        seconds_for(model, constrained, 4)  # warm: the grammar tokenizer is built once
        free_s, constrained_s, made = [], [], []
        for _ in range(rounds):
            # the constrained answer ends with its JSON; the free one makes as many tokens
            seconds, n = decode_per_token(model, constrained, tokens)
            constrained_s.append(seconds)
            made.append(n)
            seconds, _ = decode_per_token(model, free, n)
            free_s.append(seconds)
        best_free, best_constrained = min(free_s), min(constrained_s)
        results[label] = {
            "free_us_per_token": best_free * 1e6,
            "constrained_us_per_token": best_constrained * 1e6,
            "added_us_per_token": (best_constrained - best_free) * 1e6,
            "ratio": best_constrained / best_free,
            "constrained_tokens": made,
        }
        model.unload()
    report = {
        "settings": {"rounds": rounds, "tokens": tokens, "schema": SCHEMA},
        "results": results,
    }
    save("structured_output", report)
    rows = [
        [
            label,
            fmt(r["free_us_per_token"], 0),
            fmt(r["constrained_us_per_token"], 0),
            fmt(r["added_us_per_token"], 0),
            f"{r['ratio']:.2f}x",
        ]
        for label, r in results.items()
    ]
    print()
    print(f"structured output: greedy, up to {tokens} tokens, best of {rounds} alternating rounds")
    headers = ["harness", "free us/token", "JSON schema us/token", "added us/token", "ratio"]
    print(table(headers, rows))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    run(args.quick, args.rounds)


if __name__ == "__main__":
    main()
