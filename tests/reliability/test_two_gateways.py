"""More than one gateway: two ``cortex serve`` processes in front of the same neurons.

The neurons are the source of truth (src/cortex/gateway/scheduler.md, "More than one
gateway"): a burst of requests for a cold model through both gateways makes one load; an
eviction by one is seen by the other's routing without a failed request; and the requests,
counted by each gateway on its own, add up to what the neurons served.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import attrs
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program

from .conftest import ECHO, Parts, echo_repo, load, wait_for

OTHER = "huggingface:acme/other"
HELLO = [{"role": "user", "content": "hello"}]
CHAT = "/v1/chat/completions"


@attrs.define
class ServedGateway:
    """A ``cortex serve`` process: its API and its metrics port."""

    server: ProcessServer
    metrics_url: str

    @property
    def url(self) -> str:
        assert self.server.url is not None
        return self.server.url

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_url, name, **labels)

    def chat(self, model: str) -> httpx.Response:
        return httpx.post(f"{self.url}{CHAT}", json={"model": model, "messages": HELLO}, timeout=60)


def metric(url: str, name: str, **labels: str) -> float:
    """``name`` summed over every label not given, from a Prometheus text exposition."""
    text = httpx.get(url, timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def serve(parts: Parts, name: str, neurons: dict[str, str], poll: str) -> ServedGateway:
    """``cortex serve`` with both echo models as profiles of 16 MiB each (the echo harness's
    estimate before a fetch: a neuron refuses a load that does not fit that)."""
    (parts.tmp / f"{name}-models.toml").write_text(
        textwrap.dedent(
            """
            [[models]]
            id = "acme/echo"
            memory_mb = 16

            [[models]]
            id = "acme/other"
            memory_mb = 16
            """
        )
    )
    lines = [
        f'models_config = "{name}-models.toml"',
        "[gateway]",
        'listen = "127.0.0.1:0"',
        'metrics_listen = "127.0.0.1:0"',
        f'poll_interval = "{poll}"',
        "down_after_failures = 2",
        'load_timeout = "30s"',
        "retry_after = 2",
    ]
    for neuron, url in neurons.items():
        lines += ["[[neurons]]", f'name = "{neuron}"', f'endpoint = "{url}"']
    config = parts.tmp / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = python_program("cortex.cli", "cortex", "serve", "-c", str(config))
    server = ProcessServer([*argv, "--log-level", "warning"], cwd=str(parts.tmp)).start()
    parts.stoppers.append(server.kill)
    found = re.search(r"metrics on (http://\S+)", server.text)
    assert found is not None, server.text
    return ServedGateway(server, found.group(1))


def ready_on(neurons: dict[str, str], model: str) -> list[str]:
    return [
        name
        for name, url in neurons.items()
        for entry in httpx.get(f"{url}/models", timeout=10).json()["models"]
        if entry["id"] == model and entry["state"] == "ready"
    ]


def ready_in_catalogue(gw: ServedGateway, model: str) -> bool:
    entries = httpx.get(f"{gw.url}/v1/models", timeout=10).json()["data"]
    return any(e["id"] == model and e["state"] == "ready" for e in entries)


def neuron_total(neurons: dict[str, str], name: str, **labels: str) -> float:
    return sum(metric(f"{url}/metrics", name, **labels) for url in neurons.values())


@pytest.fixture
def other_repo(parts: Parts) -> None:
    publish_repo(parts.registry.root, "acme/other", echo_repo(reply="the other one", memory_mb=10))


@pytest.fixture
def two_neurons(parts: Parts, other_repo: None) -> Iterator[dict[str, str]]:
    """Two neurons with room for one echo model each (16 MiB to load, 10 MiB once loaded)."""
    budget = {"cpu": {"memory_mb": 20, "max_queue": 64}}
    yield {name: parts.neuron(name, devices=budget).url for name in ("n1", "n2")}


def test_a_cold_burst_through_two_gateways_makes_one_load(
    parts: Parts, two_neurons: dict[str, str]
) -> None:
    a = serve(parts, "a", two_neurons, poll="0.2s")
    b = serve(parts, "b", two_neurons, poll="0.2s")
    gateways = [a, b] * 8

    with ThreadPoolExecutor(len(gateways)) as pool:
        answers = list(pool.map(lambda gw: gw.chat(ECHO), gateways))
    assert [r.status_code for r in answers] == [200] * len(gateways), [
        r.text for r in answers if r.status_code != 200
    ]
    assert len(ready_on(two_neurons, ECHO)) == 1  # one copy in the fleet
    assert neuron_total(two_neurons, "neuron_model_loads_total", outcome="ok") == 1
    started = sum(gw.metric("cortex_cold_loads_total", outcome="ok") for gw in (a, b))
    joined = sum(gw.metric("cortex_cold_loads_total", outcome="joined") for gw in (a, b))
    # Each gateway started the load, joined it, or (when its first request was placed only after
    # the load had finished: seen once on a loaded machine) found the copy ready and used it.
    assert started >= 1 and started + joined <= 2
    # metrics add up: 8 requests through each, 16 served by the neurons
    for gw in (a, b):
        assert gw.metric("cortex_requests_total", route=CHAT, status="ok") == 8
    served = neuron_total(two_neurons, "neuron_requests_total", route=CHAT, status="200")
    assert served == 16


def test_an_eviction_by_one_gateway_is_seen_by_the_other_without_failures(
    parts: Parts, two_neurons: dict[str, str]
) -> None:
    for url in two_neurons.values():
        load(url, ECHO)  # a replica on each neuron; each neuron is then full
    a = serve(parts, "a", two_neurons, poll="0.2s")
    b = serve(parts, "b", two_neurons, poll="60s")  # b's view stays as it is at its start
    for gw in (a, b):
        wait_for(lambda gw=gw: ready_in_catalogue(gw, ECHO), what="echo ready")
        assert gw.chat(ECHO).status_code == 200
    sent = {"a": 1, "b": 1}

    # a loads the other model: it evicts one replica of echo that b still believes in
    assert a.chat(OTHER).status_code == 200
    sent["a"] += 1
    assert len(ready_on(two_neurons, ECHO)) == 1
    for _ in range(10):  # least busy alternates: b tries the evicted copy at least once
        answer = b.chat(ECHO)
        assert answer.status_code == 200, answer.text
        sent["b"] += 1

    # a unloads echo everywhere: b's view still has it on both neurons
    unloaded = httpx.post(f"{a.url}/admin/models/unload", json={"model": ECHO}, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    assert ready_on(two_neurons, ECHO) == []
    answer = b.chat(ECHO)  # both copies gone: b finds out, and loads it again
    assert answer.status_code == 200, answer.text
    sent["b"] += 1
    assert ready_on(two_neurons, ECHO) == [answer.headers["x-cortex-node"]]

    # nothing failed, and the counts add up: each gateway counted its own requests, the neurons
    # served all of them (their 404s to b's stale attempts are not answers a client saw)
    for name, gw in (("a", a), ("b", b)):
        assert gw.metric("cortex_requests_total", route=CHAT, status="error") == 0
        assert gw.metric("cortex_requests_total", route=CHAT, status="ok") == sent[name]
    served = neuron_total(two_neurons, "neuron_requests_total", route=CHAT, status="200")
    assert served == sent["a"] + sent["b"]
    assert neuron_total(two_neurons, "neuron_requests_total", route=CHAT, status="404") >= 1
