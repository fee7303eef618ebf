"""The gateway's Prometheus metrics after known traffic, scraped over HTTP and parsed with
``prometheus_client.parser``: streamed and whole answers, OpenAI and Anthropic routes, errors,
cold loads, manual evictions, bounded labels."""

from __future__ import annotations

import threading
import time
import uuid

import anthropic
import httpx
import openai
import pytest

from cortex.config import ModelProfile

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
HELLO = [{"role": "user", "content": "hello there"}]


def test_counts_tokens_durations_and_routes_after_known_traffic(fleet, metrics_of) -> None:
    model = fleet.publish_echo("ops/count", reply="alpha beta gamma delta", memory_mb=10)
    gw = fleet.gateway(models=[ModelProfile(id="ops/count", memory_mb=10)], aliases={"ops": model})
    metrics = metrics_of(gw)
    client = gw.client()

    raw = client.chat.completions.with_raw_response.create(model="ops", messages=HELLO)
    whole = raw.parse()
    node = raw.headers["x-cortex-node"]
    prompt, completion = whole.usage.prompt_tokens, whole.usage.completion_tokens
    assert prompt > 0 and completion > 0
    # A stream that did not ask for usage: the gateway asks on its behalf (for the token
    # counters) and keeps the usage-only chunk from the client.
    chunks = list(client.chat.completions.create(model="ops", messages=HELLO, stream=True))
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "alpha beta gamma delta"
    # A stream that asked for usage gets it.
    asked = list(
        client.chat.completions.create(
            model="ops", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == completion

    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model="ops", max_tokens=50, messages=HELLO)
    with claude.messages.stream(model="ops", max_tokens=50, messages=HELLO) as stream:
        streamed = stream.get_final_message()
    assert message.content[0].text == "alpha beta gamma delta"
    assert streamed.usage.output_tokens == message.usage.output_tokens

    scraped = metrics.scrape()
    labels = {"model": model, "node": node, "status": "ok"}
    assert scraped.value("cortex_requests_total", route=CHAT, **labels) == 3
    assert scraped.value("cortex_requests_total", route=MESSAGES, **labels) == 2
    anthropic_prompt = message.usage.input_tokens
    anthropic_completion = message.usage.output_tokens
    assert scraped.value("cortex_prompt_tokens_total", model=model, node=node) == (
        3 * prompt + 2 * anthropic_prompt
    )
    assert scraped.value("cortex_completion_tokens_total", model=model, node=node) == (
        3 * completion + 2 * anthropic_completion
    )
    # Every answer has a duration; only streamed answers have a time to first token.
    assert scraped.value("cortex_request_duration_seconds_count", route=CHAT, model=model) == 3
    assert scraped.value("cortex_request_duration_seconds_count", route=MESSAGES) == 2
    assert scraped.value("cortex_time_to_first_token_seconds_count", route=CHAT) == 2
    assert scraped.value("cortex_time_to_first_token_seconds_count", route=MESSAGES) == 1
    assert scraped.value("cortex_queue_wait_seconds_count", model=model) == 5
    # The gateway's own overhead: counted per routed request, well under 250 ms each.
    assert scraped.value("cortex_gateway_overhead_seconds_count") == 5
    assert scraped.value("cortex_gateway_overhead_seconds_bucket", le="0.25") == 5
    # The cold load of the first request, and nothing in flight any more.
    assert scraped.value("cortex_cold_loads_total", model=model, node=node, outcome="ok") == 1
    assert scraped.value("cortex_model_load_duration_seconds_count", model=model) == 1
    assert scraped.value("cortex_inflight_requests", model=model, node=node) == 0
    assert scraped.value("cortex_node_up", node="n1") == 1
    assert scraped.value("cortex_node_up", node="n2") == 1


def test_time_to_first_token_is_the_first_content_not_the_first_byte(fleet, metrics_of) -> None:
    """The neuron's opening chunk (role, empty content) leaves at once; the first token of a
    4 tokens/s model comes ~250 ms later. TTFT must be the latter; the decode rate ~4/s."""
    model = fleet.publish_echo(
        "ops/slow", reply="one two three four", tokens_per_second=4, memory_mb=10
    )
    fleet.load_on("n1", model)
    gw = fleet.gateway()
    metrics = metrics_of(gw)
    stream = gw.client().chat.completions.create(model=model, messages=HELLO, stream=True)
    started = time.monotonic()
    first_byte_at = None
    for _chunk in stream:
        if first_byte_at is None:
            first_byte_at = time.monotonic() - started
    assert first_byte_at is not None and first_byte_at < 0.2  # the role chunk
    scraped = metrics.scrape()
    ttft = scraped.value("cortex_time_to_first_token_seconds_sum", model=model, node="n1")
    assert 0.2 <= ttft < 1.0
    duration = scraped.value("cortex_request_duration_seconds_sum", model=model)
    assert duration >= ttft + 0.6  # three more tokens and EOS at 4/s
    # Decode rate (tokens after the first / time since it): about 4 tokens/s, never 40.
    assert scraped.value("cortex_tokens_per_second_count", model=model, node="n1") == 1
    assert scraped.value("cortex_tokens_per_second_bucket", model=model, le="10.0") == 1
    assert scraped.value("cortex_tokens_per_second_bucket", model=model, le="2.0") == 0


def test_inflight_gauge_during_a_stream(fleet, metrics_of) -> None:
    model = fleet.publish_echo("ops/long", reply="a b c d e f g h", tokens_per_second=8)
    fleet.load_on("n2", model)
    gw = fleet.gateway()
    metrics = metrics_of(gw)
    started = threading.Event()

    def stream() -> None:
        for _chunk in gw.client().chat.completions.create(model=model, messages=HELLO, stream=True):
            started.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(10)
    assert metrics.scrape().value("cortex_inflight_requests", model=model, node="n2") == 1
    worker.join(20)
    assert metrics.scrape().value("cortex_inflight_requests", model=model, node="n2") == 0


def test_errors_are_counted_with_bounded_labels(fleet, metrics_of) -> None:
    known = fleet.publish_echo("ops/known", reply="ok", memory_mb=10)
    gw = fleet.gateway(models=[ModelProfile(id="ops/known", memory_mb=10)])
    metrics = metrics_of(gw)
    client = gw.client()
    invented = [f"nobody/{uuid.uuid4().hex}" for _ in range(20)]
    for name in invented:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=HELLO)
    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nobody/else", max_tokens=5, messages=HELLO)
    assert httpx.post(f"{gw.url}/v1/completions", content=b"{", timeout=10).status_code == 400
    # A known model with a bad request still counts under its own name.
    bad = httpx.post(f"{gw.url}{CHAT}", json={"model": known, "messages": "not a list"}, timeout=30)
    assert bad.status_code == 400

    scraped = metrics.scrape()
    assert not any(name in scraped.text for name in invented)
    assert "nobody/else" not in scraped.text
    other = {"model": "other", "node": "none", "status": "error"}
    assert scraped.value("cortex_requests_total", route=CHAT, **other) == 20
    assert scraped.value("cortex_requests_total", route=MESSAGES, **other) == 1
    assert scraped.value("cortex_requests_total", route="/v1/completions", **other) == 1
    assert scraped.value("cortex_request_errors_total", route=CHAT, code="model_not_found") == 20
    assert scraped.value("cortex_request_errors_total", route="/v1/completions") == 1
    assert scraped.value("cortex_requests_total", route=CHAT, model=known, status="error") == 1
    models = {s.labels["model"] for s in scraped.samples if "model" in s.labels}
    assert models <= {known, "other"}


def test_manual_unload_is_an_eviction_and_an_event(fleet, metrics_of) -> None:
    model = fleet.publish_echo("ops/evict", reply="bye", memory_mb=10)
    gw = fleet.gateway(models=[ModelProfile(id="ops/evict", memory_mb=10, nodes=["n1"])])
    metrics = metrics_of(gw)
    loaded = httpx.post(f"{gw.url}/admin/models/load", json={"model": model}, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["nodes"] == ["n1"]
    unloaded = httpx.post(f"{gw.url}/admin/models/unload", json={"model": model}, timeout=60)
    assert unloaded.status_code == 200
    scraped = metrics.scrape()
    assert scraped.value("cortex_evictions_total", model=model, node="n1", reason="manual") == 1
    assert scraped.value("cortex_cold_loads_total", model=model, outcome="ok") == 1
    events = httpx.get(f"{gw.url}/admin/events", timeout=10).json()["events"]
    assert [(e["kind"], e["model"], e["node"], e["outcome"]) for e in events[:2]] == [
        ("evict", model, "n1", "manual"),
        ("load", model, "n1", "ok"),
    ]
    assert events[1]["duration_s"] >= 0


def test_count_tokens_is_counted(fleet, metrics_of) -> None:
    model = fleet.publish_echo("ops/counted", reply="x", memory_mb=10)
    fleet.load_on("n1", model)
    gw = fleet.gateway()
    metrics = metrics_of(gw)
    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    counted = claude.messages.count_tokens(model=model, messages=HELLO)
    assert counted.input_tokens > 0
    scraped = metrics.scrape()
    route = "/v1/messages/count_tokens"
    assert scraped.value("cortex_requests_total", route=route, model=model, node="n1") == 1
    assert scraped.value("cortex_request_duration_seconds_count", route=route) == 1
