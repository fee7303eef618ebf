"""A two-device model through the gateway: placed on two devices of one neuron by its profile
(``devices = 2``), served, then evicted (one unload frees both devices) to make room for a
model that needs one of them; the device it held as a secondary takes nothing else meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.config import (
    CortexConfig,
    Duration,
    EvictionSection,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
)
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.cluster import echo_files
from cortex.testing.devices import MultiDeviceNeuron, SpanningEcho, start_multi_device_neuron
from cortex.testing.registry import publish_repo, start_registry
from cortex.testing.servers import UvicornThread

BIG = "huggingface:acme/big-echo"
SMALL = "huggingface:acme/small-echo"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def neuron(tmp_path: Path) -> Iterator[MultiDeviceNeuron]:
    root = tmp_path / "repos"
    publish_repo(root, "acme/big-echo", echo_files(reply="big answer", memory_mb=1200))
    publish_repo(root, "acme/small-echo", echo_files(reply="small answer", memory_mb=700))
    with start_registry(root) as registry:
        live = start_multi_device_neuron(
            registry.url,
            tmp_path / "cache",
            {"cpu": 1000, "cpu:1": 1000},
            [SpanningEcho(estimate_mb=700)],
        )
        try:
            yield live
        finally:
            live.stop()


@pytest.fixture
def gateway(neuron: MultiDeviceNeuron) -> Iterator[str]:
    config = CortexConfig(
        gateway=GatewaySection(poll_interval=Duration(0.2), load_timeout=Duration(60.0)),
        eviction=EvictionSection(strategy="lru"),
        neurons=[NeuronRef("multi", neuron.url)],
    )
    models = ModelsConfig(
        models=[
            ModelProfile(id="acme/big-echo", memory_mb=1200, devices=2),
            ModelProfile(id="acme/small-echo", memory_mb=700),
        ]
    )
    server = UvicornThread(create_app(Gateway(config, models, load_strategy("lru")))).start()
    yield server.url
    server.stop()


def chat(gateway: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/chat/completions", json={"model": model, "messages": HELLO}, timeout=60
    )


def neuron_state(neuron: MultiDeviceNeuron) -> tuple[dict, dict]:
    models = {m["id"]: m for m in httpx.get(f"{neuron.url}/models").json()["models"]}
    devices = {d["key"]: d for d in httpx.get(f"{neuron.url}/discovery").json()["devices"]}
    return models, devices


def test_a_two_device_model_is_placed_served_and_evicted(
    gateway: str, neuron: MultiDeviceNeuron
) -> None:
    # 1200 MiB does not fit one 1000 MiB device: the profile spans two, 600 MiB each
    reply = chat(gateway, "acme/big-echo")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "big answer"
    models, devices = neuron_state(neuron)
    assert models[BIG]["devices"] == ["cpu", "cpu:1"]
    assert devices["cpu:1"]["reserved_by"] == BIG
    assert devices["cpu"]["free_memory"] == devices["cpu:1"]["free_memory"] == 400 * 2**20

    # 700 MiB on one device: only the primary may take it (cpu:1 is reserved), and it has
    # 400 MiB free: the gateway evicts the idle two-device model, which frees both devices
    reply = chat(gateway, "acme/small-echo")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "small answer"
    models, devices = neuron_state(neuron)
    assert BIG not in models
    assert models[SMALL]["devices"] == [models[SMALL]["device"]]
    assert devices["cpu:1"]["reserved_by"] is None
    free = sorted(d["free_memory"] for d in devices.values())
    assert free == [300 * 2**20, 1000 * 2**20]

    # and back: the big one needs both devices again, so the small one goes
    reply = chat(gateway, "acme/big-echo")
    assert reply.status_code == 200, reply.text
    models, _ = neuron_state(neuron)
    assert SMALL not in models and sorted(models[BIG]["devices"]) == ["cpu", "cpu:1"]
