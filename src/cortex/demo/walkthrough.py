"""The demo's steps, each printed as it happens: what cortex does, shown through real clients.

Every step talks to the running fleet the way a user would: plain HTTP for ``/v1/models`` and
``/health``, the official ``openai`` and ``anthropic`` SDKs for generation, the neurons' own API to
show where models are loaded, the dashboard's page and the data it draws, and the gateway's
Prometheus endpoint for the metrics that traffic produced. A step that fails says why and the
walkthrough stops (exit code 1); nothing is faked.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx

from cortex.demo.configs import BETA
from cortex.demo.models import DemoModels

Printer = Callable[[str], None]
HELLO: list[Any] = [{"role": "user", "content": "Tell me about the river and the mountain."}]


class StepFailed(RuntimeError):
    """A walkthrough step did not see what it expected."""


@attrs.define
class Fleet:
    """URLs of the running demo fleet."""

    gateway: str
    metrics: str
    neurons: dict[str, str]
    registry: str


def banner(out: Printer, number: int, title: str) -> None:
    out("")
    out(f"== {number}. {title} " + "=" * max(0, 74 - len(title)))


def wait_for_nodes(fleet: Fleet, count: int, timeout: float = 60.0) -> dict[str, Any]:
    """Until the gateway's poller sees ``count`` neurons up; returns ``/health``."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{fleet.gateway}/health", timeout=5).json()
        except httpx.HTTPError:
            health = {}
        if health.get("nodes_up") == count:
            return health
        time.sleep(0.2)
    raise StepFailed(f"the gateway did not see {count} neurons up in {timeout:.0f}s: {health}")


def show_catalogue(out: Printer, fleet: Fleet) -> list[dict[str, Any]]:
    data = httpx.get(f"{fleet.gateway}/v1/models", timeout=10).json()["data"]
    out(f"GET {fleet.gateway}/v1/models  ->  {len(data)} entries")
    out(f"  {'id':<36} {'state':<10} {'loaded on':<12} alias for")
    for entry in data:
        where = ",".join(p["node"] for p in entry["loaded_on"]) or "-"
        out(f"  {entry['id']:<36} {entry['state']:<10} {where:<12} {entry['alias_for'] or ''}")
    return data


def openai_client(fleet: Fleet) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{fleet.gateway}/v1", api_key="demo", max_retries=0)


def stream_chat(out: Printer, fleet: Fleet, model: str, max_tokens: int = 24) -> float:
    """Stream one chat completion with the openai SDK; prints the text live; returns TTFT."""
    started = time.monotonic()
    first: float | None = None
    pieces = 0
    stream = openai_client(fleet).chat.completions.create(
        model=model, messages=HELLO, max_tokens=max_tokens, stream=True, temperature=0
    )
    out_line = "  assistant: "
    text = ""
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.content or ""
        if delta and first is None:
            first = time.monotonic() - started
        if delta:
            pieces += 1
            text += delta
    total = time.monotonic() - started
    out(out_line + " ".join(text.split()))
    if first is None:
        raise StepFailed(f"{model}: the stream carried no text")
    tokens = f", {usage.completion_tokens} tokens" if usage is not None else ""
    out(f"  first token after {first * 1000:.0f} ms, {pieces} chunks{tokens}, {total:.2f} s total")
    return first


def step_stream(out: Printer, fleet: Fleet, model: str, alias: str) -> None:
    out(f"openai SDK, stream=True, model={alias!r} (an alias for {model}); not loaded yet, so")
    out("the gateway picks a neuron, asks it to load the model (cold load), then streams:")
    cold = stream_chat(out, fleet, alias)
    out("the same request again, now that the model is warm:")
    warm = stream_chat(out, fleet, alias)
    out(f"cold first token {cold * 1000:.0f} ms vs warm {warm * 1000:.0f} ms")


def step_gguf(out: Printer, fleet: Fleet, model: str) -> None:
    out(f"openai SDK, model={model!r}: a GGUF repo, so the llama.cpp harness loads it")
    stream_chat(out, fleet, model, max_tokens=16)


def step_anthropic(out: Printer, fleet: Fleet, model: str) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=fleet.gateway, api_key="demo", max_retries=0)
    out(f"anthropic SDK, POST /v1/messages, model={model!r} (stream=True):")
    with client.messages.stream(model=model, max_tokens=24, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    out("  assistant: " + " ".join(text.split()))
    out(
        f"  stop_reason={final.stop_reason}, input_tokens={final.usage.input_tokens}, "
        f"output_tokens={final.usage.output_tokens}"
    )


def step_status(out: Printer, fleet: Fleet) -> None:
    """``cortex status`` as an operator would run it, in its own process."""
    argv = [sys.executable, "-m", "cortex.cli", "cortex", "status", "--endpoint", fleet.gateway]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not done.stdout.strip():
        raise StepFailed(
            f"`cortex status` exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    out(f"$ cortex status --endpoint {fleet.gateway}")
    for line in done.stdout.rstrip().splitlines():
        out(f"  {line}")


def step_dashboard(out: Printer, fleet: Fleet) -> dict[str, Any]:
    """The dashboard: its page answers, and what it draws now, from the same data it reads."""
    url = f"{fleet.gateway}/ui/"
    page = httpx.get(url, timeout=10)
    answer = httpx.get(f"{fleet.gateway}/ui/api/state", timeout=10)
    if page.status_code != 200 or "cortex fleet" not in page.text or answer.status_code != 200:
        raise StepFailed(f"the dashboard did not answer: {page.status_code} / {answer.status_code}")
    state = answer.json()
    health = state["health"]
    every = state["dashboard"]["poll_s"]
    out(f"open {url} in a browser: this fleet, live (refreshed every {every:g} s),")
    out("with load, unload, pin and unpin buttons (docs/operators.md: the dashboard)")
    out(f"GET {fleet.gateway}/ui/api/state, what the page draws now:")
    out(
        f"  gateway {health['status']}: {health['nodes_up']}/{health['nodes_total']} nodes up, "
        f"{health['models_ready']} model(s) ready"
    )
    for node in state["status"]["nodes"]:
        for device in node["devices"]:
            out(
                f"  node {node['name']} {device['key']}: {device['used_bytes'] / 2**20:.0f} MiB "
                f"of {device['total_bytes'] / 2**20:.0f} MiB used, queue {device['queue_depth']}"
            )
    for model in state["status"]["models"]:
        left = model["keep_alive_left_s"]
        out(
            f"  {model['id']} on {model['node']}: {model['state']}, {model['running']} running, "
            f"{model['waiting']} waiting (max_batch {model['max_batch']}), keep_alive "
            + ("never" if model["keep_alive_s"] is None else f"{left:.0f}s left")
        )
    charts = [f"{s['model']} on {s['node']}" for s in state["series"]]
    out(f"  tok/s and TTFT charts: {', '.join(charts) or 'none yet (sampled every 5 s)'}")
    return state


def neuron_models(fleet: Fleet, node: str) -> list[dict[str, Any]]:
    return httpx.get(f"{fleet.neurons[node]}/models", timeout=10).json()["models"]


def show_node(out: Printer, fleet: Fleet, node: str) -> set[str]:
    models = neuron_models(fleet, node)
    used = sum(m.get("memory_bytes") or 0 for m in models) / 2**20
    names = sorted(m["id"] for m in models)
    out(f"  neuron {node}: {', '.join(names) or '(nothing loaded)'}  [{used:.0f} MB used]")
    return {m["id"].split(":", 1)[-1] for m in models}


def ask(fleet: Fleet, model: str) -> str:
    raw = openai_client(fleet).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    return raw.headers.get("x-cortex-node", "?")


def step_eviction(out: Printer, fleet: Fleet, echoes: tuple[str, ...], memory_mb: int) -> None:
    first, second, third = echoes[:3]
    out(
        f"neuron {BETA} has a 250 MB CPU budget; each echo model declares {memory_mb} MB, so it"
        " holds two."
    )
    for model in (first, second):
        node = ask(fleet, model)
        out(f"  asked {model:<14} -> served by {node}")
    show_node(out, fleet, BETA)
    out(f"asking {first} again (now {second} is the least recently used), then {third}:")
    ask(fleet, first)
    node = ask(fleet, third)
    out(f"  asked {third:<14} -> served by {node}; the lru strategy made room")
    loaded = show_node(out, fleet, BETA)
    if second in loaded or third not in loaded:
        raise StepFailed(f"expected {second} evicted and {third} loaded, got {sorted(loaded)}")


_SHOWN_METRICS = (
    "cortex_requests_total",
    "cortex_request_errors_total",
    "cortex_time_to_first_token_seconds_count",
    "cortex_time_to_first_token_seconds_sum",
    "cortex_prompt_tokens_total",
    "cortex_completion_tokens_total",
    "cortex_cold_loads_total",
    "cortex_model_load_duration_seconds_sum",
    "cortex_evictions_total",
    "cortex_gateway_overhead_seconds_count",
    "cortex_gateway_overhead_seconds_sum",
    "cortex_node_up",
)


def step_metrics(out: Printer, fleet: Fleet) -> list[str]:
    text = httpx.get(fleet.metrics, timeout=10).text
    out(f"GET {fleet.metrics} (Prometheus), the samples this walkthrough produced:")
    shown = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _SHOWN_METRICS:
            shown.append(line)
            out(f"  {line}")
    if not any(line.startswith("cortex_evictions_total") for line in shown):
        raise StepFailed("no cortex_evictions_total sample after an eviction")
    return shown


def run_walkthrough(out: Printer, fleet: Fleet, models: DemoModels, memory_mb: int) -> None:
    """All the steps, numbered; raises :class:`StepFailed` on the first that goes wrong."""
    number = 1
    banner(out, number, "the merged catalogue: /v1/models")
    show_catalogue(out, fleet)
    chat_model = models.torch_model or models.echo_models[0]
    alias = "tiny" if models.torch_model else "echo"
    number += 1
    banner(out, number, "a streamed chat with the openai SDK (cold load on first use)")
    step_stream(out, fleet, chat_model, alias)
    if models.gguf_model:
        number += 1
        banner(out, number, "a GGUF model through the llama.cpp harness")
        step_gguf(out, fleet, models.gguf_model)
    number += 1
    banner(out, number, "the same model through the anthropic SDK")
    step_anthropic(out, fleet, alias)
    number += 1
    banner(out, number, "fleet status")
    step_status(out, fleet)
    number += 1
    banner(out, number, "the same fleet in the browser: the dashboard")
    step_dashboard(out, fleet)
    number += 1
    banner(out, number, "an eviction when a third model needs room")
    step_eviction(out, fleet, models.echo_models, memory_mb)
    number += 1
    banner(out, number, "the metrics that traffic produced")
    step_metrics(out, fleet)
    number += 1
    banner(out, number, "the catalogue now")
    show_catalogue(out, fleet)
