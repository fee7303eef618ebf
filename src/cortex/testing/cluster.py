"""A real cortex fleet on loopback for tests: an in-suite registry, ``neuron run`` processes
and gateways.

Echo models are published to the registry and fetched by the neurons through the huggingface
source, exactly as real models are. Gateways run in the test process (a uvicorn thread) so tests
can read their metrics and usage; nothing here is a stand-in for a cortex component::

    fleet = Fleet(tmp, start_registry(tmp / "repos"))
    fleet.start_neurons(n1=1000, n2=1000)                 # CPU budgets in MB
    model = fleet.publish_echo("acme/echo", reply="hi", memory_mb=50)
    gw = fleet.gateway(models=[ModelProfile(id="acme/echo", memory_mb=50)])
    gw.client().chat.completions.create(model="acme/echo", messages=[...])
    fleet.stop()
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai

from cortex.auth import GatewayAuth
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
from cortex.testing.metrics import sum_samples
from cortex.testing.registry import RunningRegistry, publish_repo
from cortex.testing.servers import ProcessServer, UvicornThread, python_program


def echo_files(**spec: Any) -> dict[str, bytes]:
    return {"echo.json": json.dumps(spec).encode(), "README.md": b"an echo model for tests\n"}


def neuron_toml(name: str, registry_url: str, cache: Path, cpu_mb: int) -> str:
    return f"""
name = "{name}"
default_source = "huggingface"

[sources.huggingface]
endpoint = "{registry_url}"
auth_env = "CORTEX_TEST_NO_TOKEN"
cache_dir = "{cache}"

[devices."cpu"]
memory_mb = {cpu_mb}
"""


def neuron_argv(config_path: Path) -> list[str]:
    return python_program(
        "cortex.cli",
        "neuron",
        "run",
        "-c",
        str(config_path),
        "--listen",
        "127.0.0.1:0",
        "--drain-seconds",
        "2",
    )


@attrs.define
class Fleet:
    """Registry + neurons; gateways are started per test with their own models.toml."""

    tmp: Path
    registry: RunningRegistry
    neurons: dict[str, ProcessServer] = attrs.field(factory=dict)
    gateways: list[UvicornThread] = attrs.field(factory=list)

    def publish_echo(self, repo: str, **spec: Any) -> str:
        publish_repo(self.registry.root, repo, echo_files(**spec))
        return f"huggingface:{repo}"

    def start_neurons(self, **cpu_budgets_mb: int) -> None:
        """Start neurons in parallel, one per ``name=cpu_budget_mb`` (real ``neuron run``)."""
        servers = {}
        for name, cpu_mb in cpu_budgets_mb.items():
            path = self.tmp / f"{name}.toml"
            cache = self.tmp / f"cache-{name}"
            path.write_text(neuron_toml(name, self.registry.url, cache, cpu_mb))
            # No GPU probing in tests (CUDA_VISIBLE_DEVICES=""): the CPU device is the budget.
            env = {"CORTEX_TEST_NO_TOKEN": "", "CUDA_VISIBLE_DEVICES": ""}
            servers[name] = ProcessServer(neuron_argv(path), env=env)
        threads = [threading.Thread(target=s.start) for s in servers.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, server in servers.items():
            if server.url is None:
                raise RuntimeError(f"neuron {name} did not start:\n{server.text}")
            self.neurons[name] = server

    def neuron_url(self, name: str) -> str:
        url = self.neurons[name].url
        assert url is not None
        return url

    def gateway(
        self,
        models: list[ModelProfile] | None = None,
        aliases: dict[str, str] | None = None,
        strategy: str = "lru",
        defrag_after_cycles: int = 0,
        auth: GatewayAuth | None = None,
        **gateway_settings: Any,
    ) -> GatewayUnderTest:
        """A gateway in front of every neuron; ``auth`` (default: no keys) is the key check."""
        settings = {
            "poll_interval": Duration(0.2),
            "load_timeout": Duration(60.0),
            "idle_timeout": Duration(30.0),
            "retry_after": 2,
            **gateway_settings,
        }
        config = CortexConfig(
            gateway=GatewaySection(**settings),
            eviction=EvictionSection(strategy=strategy, defrag_after_cycles=defrag_after_cycles),
            neurons=[NeuronRef(name, self.neuron_url(name)) for name in self.neurons],
        )
        gateway = Gateway(
            config,
            ModelsConfig(models=models or [], aliases=aliases or {}),
            load_strategy(strategy),
        )
        server = UvicornThread(create_app(gateway, auth)).start()
        self.gateways.append(server)
        return GatewayUnderTest(gateway, server)

    def neuron_models(self, name: str) -> dict[str, dict[str, Any]]:
        answer = httpx.get(f"{self.neuron_url(name)}/models", timeout=10).json()
        return {m["id"]: m for m in answer["models"]}

    def load_on(self, name: str, model_id: str) -> None:
        answer = httpx.post(
            f"{self.neuron_url(name)}/models/load", json={"model_id": model_id}, timeout=60
        )
        assert answer.status_code == 200, answer.text

    def unload_everything(self) -> None:
        for name in self.neurons:
            proc = self.neurons[name].proc
            if proc is None or proc.poll() is not None:
                continue
            for model_id in self.neuron_models(name):
                httpx.post(
                    f"{self.neuron_url(name)}/models/unload",
                    json={"model_id": model_id},
                    timeout=30,
                )

    def stop(self) -> None:
        for server in self.gateways:
            server.stop()
        for neuron in self.neurons.values():
            if neuron.proc is not None and neuron.proc.poll() is None:
                neuron.proc.terminate()
        for neuron in self.neurons.values():
            neuron.terminate()
        self.registry.stop()


@attrs.define
class GatewayUnderTest:
    gateway: Gateway
    server: UvicornThread

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """The sample ``name``, summed over every label not given (e.g. over nodes)."""
        return sum_samples(self.gateway.metrics.registry, name, **labels)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.05)

    def catalogue(self) -> dict[str, dict[str, Any]]:
        data = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return {e["id"]: e for e in data}

    def stop(self) -> None:
        self.server.stop()
