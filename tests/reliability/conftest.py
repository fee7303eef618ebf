"""Real parts on loopback for the reliability tests: a registry with echo models, neurons (in
this process or as ``neuron run`` processes) and gateways (uvicorn threads).

Echo models are published to an HF-compatible registry and fetched by the neurons' huggingface
source, exactly like real models, so every fault below goes through the real code paths.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from cortex.config import (
    AuthSection,
    CortexConfig,
    Duration,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronConfig,
    NeuronRef,
    NeuronTls,
    UsageSection,
    structure_config,
)
from cortex.gateway.app import create_app as create_gateway_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.neuron.daemon import build_node, make_app
from cortex.neuron.node import Node
from cortex.testing import cluster
from cortex.testing.registry import RunningRegistry, publish_repo, start_registry
from cortex.testing.servers import ProcessServer, UvicornThread, python_program

ECHO = "huggingface:acme/echo"
SLOW = "huggingface:acme/slow"
SLOW_WORDS = 200


def echo_repo(**spec: Any) -> dict[str, bytes]:
    return {"echo.json": json.dumps(spec).encode(), "README.md": b"echo model for tests\n"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """acme/echo (repeats the last user message, instant) and acme/slow (200 words at 40/s)."""
    root = tmp_path_factory.mktemp("repos")
    publish_repo(root, "acme/echo", echo_repo(reply=None, memory_mb=10))
    slow = " ".join(f"w{i}" for i in range(SLOW_WORDS))
    publish_repo(root, "acme/slow", echo_repo(reply=slow, tokens_per_second=40, memory_mb=10))
    running = start_registry(root)
    yield running
    running.stop()


def neuron_settings(name: str, registry_url: str, cache: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "default_source": "huggingface",
        "sources": {
            "huggingface": {
                "endpoint": registry_url,
                "auth_env": "CORTEX_TEST_NO_TOKEN",
                "cache_dir": str(cache),
            }
        },
        "devices": {"cpu": {"memory_mb": 1024, "max_queue": 64}},
    }
    data.update(overrides)
    return data


@attrs.define
class InProcessNeuron:
    node: Node
    server: UvicornThread

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"
    return json.dumps(value)


def neuron_toml(settings: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for table, value in settings.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            for key, sub in value.items():  # [sources."huggingface"], [devices."cpu"]
                lines.append(f'[{table}."{key}"]')
                lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
        elif isinstance(value, dict):  # a plain table: [tls]
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


@attrs.define
class Parts:
    """Starts neurons and gateways for one test and stops them all afterwards."""

    tmp: Path
    registry: RunningRegistry
    stoppers: list[Callable[[], Any]] = attrs.field(factory=list)
    count: int = 0

    def _cache(self, name: str) -> Path:
        self.count += 1
        return self.tmp / f"cache-{name}-{self.count}"

    def neuron(self, name: str = "n1", **overrides: Any) -> InProcessNeuron:
        settings = neuron_settings(name, self.registry.url, self._cache(name), **overrides)
        config = structure_config(settings, NeuronConfig, f"{name} neuron.toml")
        node = build_node(config)
        server = UvicornThread(make_app(node, drain_seconds=1)).start()
        self.stoppers.append(server.stop)
        return InProcessNeuron(node, server)

    def neuron_process(
        self, name: str = "p1", env: dict[str, str] | None = None, **overrides: Any
    ) -> ProcessServer:
        """A real ``neuron run`` process (for tests that kill or restart it)."""
        settings = neuron_settings(name, self.registry.url, self._cache(name), **overrides)
        path = self.tmp / f"{name}-{self.count}.toml"
        path.write_text(neuron_toml(settings))
        argv = python_program("cortex.cli", "neuron", "run", "-c", str(path))
        argv += ["--listen", "127.0.0.1:0", "--drain-seconds", "1", "--log-level", "warning"]
        full_env = {"CORTEX_TEST_NO_TOKEN": "", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        server = ProcessServer(argv, env=full_env).start()
        self.stoppers.append(server.kill)
        return server

    def gateway(
        self,
        neurons: dict[str, str],
        models: list[ModelProfile] | None = None,
        auth: AuthSection | None = None,
        neuron_tls: NeuronTls | None = None,
        usage: UsageSection | None = None,
        aliases: dict[str, str] | None = None,
        **settings: Any,
    ) -> GatewayUnderTest:
        values: dict[str, Any] = {
            "poll_interval": Duration(0.2),
            "down_after_failures": 2,
            "load_timeout": Duration(30.0),
            "idle_timeout": Duration(10.0),
            "retry_after": 2,
            **settings,
        }
        config = CortexConfig(
            gateway=GatewaySection(**values),
            auth=auth or AuthSection(),
            usage=usage or UsageSection(),
            neurons=[NeuronRef(name, url) for name, url in neurons.items()],
            neuron_tls=neuron_tls or NeuronTls(),
        )
        gateway = Gateway(
            config,
            ModelsConfig(models=models or [], aliases=aliases or {}),
            load_strategy("lru"),
        )
        server = UvicornThread(create_gateway_app(gateway)).start()
        self.stoppers.append(server.stop)
        return GatewayUnderTest(gateway, server)

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            # A part that is already gone must not hide the test's result.
            with contextlib.suppress(Exception):
                stop()


@attrs.define
class GatewayUnderTest(cluster.GatewayUnderTest):
    """The cluster's gateway handle (url, client, metric, wait_for), plus a node's health."""

    def node_up(self, name: str) -> bool:
        assert self.gateway.fleet is not None
        return self.gateway.fleet.nodes[name].up


@pytest.fixture
def parts(registry: RunningRegistry, tmp_path: Path) -> Iterator[Parts]:
    started = Parts(tmp_path, registry)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def module_parts(
    registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Parts]:
    """Like ``parts``, shared by a test module (for servers every test can reuse)."""
    started = Parts(tmp_path_factory.mktemp("parts"), registry)
    try:
        yield started
    finally:
        started.stop()


def load(url: str, model_id: str, headers: dict[str, str] | None = None) -> None:
    answer = httpx.post(
        f"{url}/models/load", json={"model_id": model_id}, headers=headers, timeout=60
    )
    assert answer.status_code == 200, answer.text


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)
