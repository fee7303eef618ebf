"""A real neuron on loopback, fed by a real HF-compatible registry with tiny models.

The neuron runs in this process (``make_app`` served by uvicorn on port 0) so tests can reach
into its node for deterministic set-ups (blocking a device worker, poisoning one); everything
else goes over real HTTP with the official ``openai`` SDK. ``test_daemon.py`` runs ``neuron run``
as a real process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest

from cortex.config import NeuronConfig, structure_config
from cortex.neuron.daemon import build_node, make_app
from cortex.neuron.node import Node
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import UvicornThread

ECHO_REPLY = "hello there friend, the cat sings"
SLOW_WORDS = 80


def echo_repo(**spec: Any) -> dict[str, bytes]:
    return {"echo.json": json.dumps(spec).encode(), "README.md": b"echo model for tests\n"}


@pytest.fixture(scope="module")
def model_registry(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,
    tiny_qwen2_dir: Path,
    tiny_embedding_dir: Path,
) -> Iterator[RunningRegistry]:
    """acme/tiny-llama, acme/tiny-qwen2 (transformers), acme/tiny-embedder (a
    sentence-transformers embedding model), acme/echo (instant), acme/slow-echo
    (20 tokens/s, long), acme/readme-only (nothing loadable) and
    acme/weights-only (weights no harness accepts)."""
    root = tmp_path_factory.mktemp("repos")
    publish_repo(root, "acme/tiny-llama", tiny_llama_dir)
    publish_repo(root, "acme/tiny-qwen2", tiny_qwen2_dir)
    publish_repo(root, "acme/tiny-embedder", tiny_embedding_dir)
    publish_repo(root, "acme/echo", echo_repo(reply=ECHO_REPLY))
    slow_reply = " ".join(f"word{i}" for i in range(SLOW_WORDS))
    publish_repo(root, "acme/slow-echo", echo_repo(reply=slow_reply, tokens_per_second=20))
    publish_repo(
        root,
        "acme/tool-echo",
        echo_repo(
            reply="It is sunny.",
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
        ),
    )
    publish_repo(
        root,
        "acme/two-tool-echo",
        echo_repo(
            reply="Done.",
            tool_calls=[
                {"name": "get_weather", "arguments": {"city": "Paris"}},
                {"name": "get_weather", "arguments": {"city": "Lyon"}},
            ],
        ),
    )
    publish_repo(
        root,
        "acme/think-echo",
        echo_repo(reply="The answer.", reasoning="Let me see.", opens_think=True),
    )
    publish_repo(root, "acme/readme-only", {"README.md": b"no weights here\n"})
    # safetensors without config.json: the source finds weights, no harness accepts them
    publish_repo(
        root, "acme/weights-only", {"model.safetensors": tiny_llama_dir / "model.safetensors"}
    )
    registry = start_registry(root)
    yield registry
    registry.stop()


def neuron_config(registry_url: str, cache: Path, **overrides: Any) -> NeuronConfig:
    data: dict[str, Any] = {
        "name": "test-neuron",
        "default_source": "huggingface",
        "sources": {
            "huggingface": {
                "endpoint": registry_url,
                "auth_env": "CORTEX_TEST_NO_TOKEN",
                "cache_dir": str(cache / "hf"),
            },
            "helexa": {
                "endpoint": registry_url,
                "auth_env": "CORTEX_TEST_NO_TOKEN",
                "cache_dir": str(cache / "helexa"),
            },
        },
        "devices": {"cpu": {"memory_mb": 1024, "max_queue": 8}},
    }
    data.update(overrides)
    return structure_config(data, NeuronConfig, "test neuron.toml")


@attrs.define
class LiveNeuron:
    node: Node
    server: UvicornThread

    @property
    def url(self) -> str:
        return self.server.url

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def load(self, model_id: str, **extra: Any) -> dict[str, Any]:
        with self.http() as client:
            response = client.post("/models/load", json={"model_id": model_id, **extra})
        assert response.status_code == 200, response.text
        return response.json()["model"]

    def models(self) -> dict[str, dict[str, Any]]:
        with self.http() as client:
            return {m["id"]: m for m in client.get("/models").json()["models"]}

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics (0 when absent)."""
        with self.http() as client:
            text = client.get("/metrics").text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            sample, _, label_text = key.partition("{")
            if sample != name:
                continue
            parts = sorted(p for p in label_text.rstrip("}").split(",") if p)
            if ",".join(parts) == wanted:
                return float(value)
        return 0.0

    def wait_for(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.stop()


def start_neuron(config: NeuronConfig) -> LiveNeuron:
    node = build_node(config)
    server = UvicornThread(make_app(node, drain_seconds=2)).start()
    return LiveNeuron(node=node, server=server)


@pytest.fixture(scope="module")
def neuron(
    model_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveNeuron]:
    live = start_neuron(neuron_config(model_registry.url, tmp_path_factory.mktemp("cache")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def neuron_factory(
    model_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LiveNeuron]]:
    """Start extra neurons with config overrides; all are stopped at the end of the module."""
    started: list[LiveNeuron] = []

    def start(**overrides: Any) -> LiveNeuron:
        cache = tmp_path_factory.mktemp("cache")
        live = start_neuron(neuron_config(model_registry.url, cache, **overrides))
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
