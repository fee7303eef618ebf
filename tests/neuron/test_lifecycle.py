"""Model lifecycle on a real neuron: load/unload cycles, coalescing, states, default models,
unload waiting for in-flight requests, and device poisoning."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from cortex.devices import Device
from cortex.harness import DeviceFault
from cortex.neuron.daemon import make_app
from cortex.neuron.node import Node
from cortex.neuron.workers import DeviceWorker
from cortex.plugins import get_registry
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import RunningRegistry
from cortex.testing.servers import UvicornThread
from tests.neuron.conftest import LiveNeuron, neuron_config

LLAMA = "huggingface:acme/tiny-llama"


class SideLoop:
    """An event loop in the test thread, to submit jobs to a device worker directly (what the
    neuron's own handlers do) for set-ups that must be deterministic."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def submit(self, worker: DeviceWorker, job: Callable[[], object]) -> None:
        async def go() -> None:
            worker.submit(job, internal=True)

        self.loop.run_until_complete(go())

    def block(self, worker: DeviceWorker) -> threading.Event:
        """Occupy the worker until the returned event is set."""
        started, release = threading.Event(), threading.Event()

        def job() -> None:
            started.set()
            release.wait(30)

        self.submit(worker, job)
        assert started.wait(10)
        return release

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def side_loop() -> Iterator[SideLoop]:
    loop = SideLoop()
    yield loop
    loop.close()


def cpu_free(neuron: LiveNeuron) -> int:
    with neuron.http() as client:
        devices = client.get("/discovery").json()["devices"]
    return next(d["free_memory"] for d in devices if d["key"] == "cpu")


def test_load_unload_cycles_free_what_they_took(neuron: LiveNeuron) -> None:
    baseline = cpu_free(neuron)
    for _ in range(3):
        model = neuron.load("acme/tiny-llama")
        assert model["state"] == "ready" and model["harness"] == "torch"
        assert model["memory_bytes"] > 500_000 and model["context_length"] == 256
        assert cpu_free(neuron) == baseline - model["memory_bytes"]
        with neuron.http() as client:
            answer = client.post("/models/unload", json={"model_id": "acme/tiny-llama"}).json()
        assert answer == {
            "model_id": LLAMA,
            "state": "unloaded",
            "freed_bytes": model["memory_bytes"],
        }
        assert LLAMA not in neuron.models()
        assert cpu_free(neuron) == baseline


def test_loading_a_ready_model_returns_at_once(neuron: LiveNeuron) -> None:
    first = neuron.load("acme/echo")
    loads = neuron.metric("neuron_model_loads_total", outcome="ok")
    started = time.monotonic()
    again = neuron.load("huggingface:acme/echo")
    assert time.monotonic() - started < 1.0
    assert again["loaded_at"] == first["loaded_at"]
    assert neuron.metric("neuron_model_loads_total", outcome="ok") == loads


def test_concurrent_loads_coalesce_into_one(
    neuron_factory: Callable[..., LiveNeuron], side_loop: SideLoop
) -> None:
    live = neuron_factory()
    worker = live.node.workers.get("cpu")
    assert worker is not None
    release = side_loop.block(worker)  # the load cannot finish until released: all requests meet
    results: list[dict] = []

    def load(model_id: str) -> None:
        with live.http() as client:
            response = client.post("/models/load", json={"model_id": model_id})
        results.append(response.json())

    ids = ["acme/tiny-qwen2", "huggingface:acme/tiny-qwen2"] * 2
    threads = [threading.Thread(target=load, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    # visible as loading meanwhile
    live.wait_for(
        lambda: live.models().get("huggingface:acme/tiny-qwen2", {}).get("state") == "loading"
    )
    release.set()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    assert {r["model"]["id"] for r in results} == {"huggingface:acme/tiny-qwen2"}
    assert {r["model"]["loaded_at"] for r in results} == {results[0]["model"]["loaded_at"]}
    assert live.metric("neuron_model_loads_total", outcome="ok") == 1


def test_unload_waits_for_in_flight_requests(neuron: LiveNeuron) -> None:
    neuron.load("acme/slow-echo")
    text: list[str] = []
    client = neuron.openai()

    def generate() -> None:
        response = client.chat.completions.create(
            model="acme/slow-echo", messages=[{"role": "user", "content": "go"}], max_tokens=30
        )
        text.append(response.choices[0].message.content or "")

    thread = threading.Thread(target=generate)
    thread.start()
    neuron.wait_for(lambda: neuron.models()["huggingface:acme/slow-echo"]["in_flight"] == 1)
    with neuron.http() as http:
        answer = http.post("/models/unload", json={"model_id": "acme/slow-echo"})
    thread.join(30)
    assert answer.status_code == 200
    assert text and len(text[0].split()) == 30  # the request finished before the unload
    assert "huggingface:acme/slow-echo" not in neuron.models()


def test_default_models_load_in_background_and_health_reports_them(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    live = neuron_factory(default_models=[{"id": "acme/echo"}, {"id": "acme/readme-only"}])

    def health() -> dict:
        with live.http() as client:
            return client.get("/health").json()

    first = health()
    assert first["default_models"]["total"] == 2
    live.wait_for(lambda: health()["default_models"]["pending"] == 0, timeout=30)
    final = health()
    assert final["status"] == "ok"
    assert final["default_models"] == {"total": 2, "ready": 1, "failed": 1, "pending": 0}
    assert live.models()["huggingface:acme/echo"]["state"] == "ready"


@pytest.fixture
def two_device_neuron(
    model_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveNeuron]:
    """A neuron with the CPU and a second device of another kind (as an accelerator plugin
    would register through cortex_discover_devices); the echo harness runs on any device.
    A device fault leaves the other device serving (``on_device_fault = "stay"``; the default,
    exiting for a restart, is tests/reliability/test_device_fault.py)."""
    config = neuron_config(
        model_registry.url, tmp_path_factory.mktemp("cache"), on_device_fault="stay"
    )
    registry = get_registry()
    devices = [*registry.devices(), Device("sim", 0, "simulated accelerator", 2**30, 2**30)]
    resolver = SourceResolver.from_config(config, registry.source_plugins())
    node = Node.build(config, registry.harnesses(), devices, resolver)
    server = UvicornThread(make_app(node, drain_seconds=2)).start()
    live = LiveNeuron(node=node, server=server)
    yield live
    live.stop()


def test_a_device_fault_poisons_only_its_worker(
    two_device_neuron: LiveNeuron, side_loop: SideLoop
) -> None:
    live = two_device_neuron
    assert live.load("acme/echo", device="sim:0")["device"] == "sim:0"
    assert live.load("acme/slow-echo", device="cpu")["device"] == "cpu"
    sim = live.node.workers.get("sim:0")
    assert sim is not None and sim.name == "sim-dev-0"
    assert {t.name for t in threading.enumerate()} >= {"cpu", "sim-dev-0"}

    def fault() -> None:
        raise DeviceFault("CUDA error: an illegal memory access was encountered")

    side_loop.submit(sim, fault)
    live.wait_for(lambda: sim.poisoned)
    echo = live.models()["huggingface:acme/echo"]
    assert echo["state"] == "failed" and echo["error"]["code"] == "device_poisoned"
    with live.http() as client:
        devices = {d["key"]: d for d in client.get("/discovery").json()["devices"]}
        assert devices["sim:0"]["state"] == "poisoned" and devices["cpu"]["state"] == "ok"
        started = time.monotonic()
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "acme/echo", "messages": [{"role": "user", "content": "x"}]},
        )
        assert chat.status_code == 503 and "Retry-After" in chat.headers
        assert "poisoned" in chat.json()["error"]["message"]
        load = client.post("/models/load", json={"model_id": "acme/tiny-llama", "device": "sim:0"})
        assert load.status_code == 503 and load.json()["error"]["code"] == "device_poisoned"
        assert time.monotonic() - started < 5  # fails fast
    # the other device keeps working
    other = live.openai().chat.completions.create(
        model="acme/slow-echo", messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert other.choices[0].message.content == "word0 word1 word2"
    assert live.metric("neuron_device_poisoned", device="sim:0") == 1
    with live.http() as client:
        assert client.post("/models/unload", json={"model_id": "acme/echo"}).status_code == 200


def test_discovery_describes_node_devices_harnesses_and_sources(neuron: LiveNeuron) -> None:
    with neuron.http() as client:
        info = client.get("/discovery").json()
    assert info["node"] == "test-neuron" and info["default_source"] == "huggingface"
    cpu = next(d for d in info["devices"] if d["key"] == "cpu")
    assert cpu["total_memory"] == 1024 * 2**20 and cpu["worker"] == "cpu"
    assert cpu["state"] == "ok" and cpu["queue_depth"] >= 0
    assert {"torch", "echo"} <= {h["name"] for h in info["harnesses"]}
    sources = {s["scheme"]: s for s in info["sources"]}
    assert sources["huggingface"]["has_token"] is False
    assert sources["helexa"]["endpoint"] == sources["huggingface"]["endpoint"]
    assert "token" not in str(info).replace("has_token", "")
    for key in ("host", "os", "driver_version", "cuda_version", "version"):
        assert key in info


def test_health_is_open_and_says_ok(neuron: LiveNeuron) -> None:
    response = httpx.get(f"{neuron.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_load_without_waiting_answers_202_then_reports_the_outcome(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    live = neuron_factory()
    with live.http() as client:
        accepted = client.post("/models/load", json={"model_id": "acme/echo", "wait": False})
        assert accepted.status_code == 202
        assert accepted.json()["model"]["state"] == "loading"
        live.wait_for(lambda: live.models()["huggingface:acme/echo"]["state"] == "ready")
        missing = client.post("/models/load", json={"model_id": "acme/gone", "wait": False})
        assert missing.status_code == 202
        live.wait_for(lambda: live.models()["huggingface:acme/gone"]["state"] == "failed")
        error = live.models()["huggingface:acme/gone"]["error"]
        assert error["code"] == "repo_not_found" and error["details"]["kind"] == "repo_not_found"
        assert client.post("/models/unload", json={"model_id": "acme/gone"}).status_code == 200
        bad = client.post("/models/load", json={"model_id": "acme/echo", "wait": "no"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "wait"


def test_estimate_is_a_preflight_only(neuron: LiveNeuron, model_registry: RunningRegistry) -> None:
    with neuron.http() as client:
        answer = client.post("/models/estimate", json={"model_id": "acme/tiny-qwen2"}).json()
        missing = client.post("/models/estimate", json={"model_id": "acme/gone"})
    assert answer["model_id"] == "huggingface:acme/tiny-qwen2"
    assert answer["harness"] == "torch"
    assert answer["download_bytes"] > 500_000
    assert answer["memory_bytes"] > answer["download_bytes"]
    assert missing.status_code == 422
    assert "huggingface:acme/tiny-qwen2" not in neuron.models()


def test_release_memory_keeps_models_usable(neuron: LiveNeuron) -> None:
    neuron.load("acme/tiny-llama")
    with neuron.http() as client:
        assert client.post("/admin/release-memory").json() == {"released": True}
    reply = neuron.openai().chat.completions.create(
        model="acme/tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage.completion_tokens >= 1


def test_an_unload_past_its_bound_ends_streams_with_an_error_frame(
    neuron_factory: Callable[..., LiveNeuron],
) -> None:
    live = neuron_factory()
    live.load("acme/slow-echo")
    live.node.unload_wait_seconds = 0.3
    frames: list[str] = []

    def stream() -> None:
        body = {
            "model": "acme/slow-echo",
            "messages": [{"role": "user", "content": "go"}],
            "stream": True,
        }
        with (
            live.http() as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            frames.extend(line for line in response.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    live.wait_for(lambda: live.models()["huggingface:acme/slow-echo"]["in_flight"] == 1)
    with live.http() as client:
        assert client.post("/models/unload", json={"model_id": "acme/slow-echo"}).is_success
    reader.join(10)
    assert frames[-1] == "data: [DONE]"
    assert '"code":"model_unloading"' in frames[-2]
    assert len(frames) < 40  # far from the 80 words of the reply
    with pytest.raises(openai.NotFoundError):
        live.openai().chat.completions.create(
            model="acme/slow-echo", messages=[{"role": "user", "content": "x"}]
        )
