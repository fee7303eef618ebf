"""Tensor parallel for real: a neuron whose CPU is two devices (``cpu`` and ``cpu:1``, one core
each), a vLLM load over both (``tensor_parallel_size=2``: two CPU worker processes, each
bound to its own core), served over HTTP and unloaded. Greedy output equals vLLM's own on one
rank (float32: the split only reorders sums of a tiny model)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.config import NeuronConfig, structure_config
from cortex.devices import Device
from cortex.neuron.daemon import make_app
from cortex.neuron.node import Node
from cortex.plugins import get_registry
from cortex.source_resolver import SourceResolver
from cortex.testing.registry import publish_repo, start_registry
from cortex.testing.servers import UvicornThread

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="tensor parallel over two CPU ranks needs two cores"
)


@pytest.fixture(scope="module")
def neuron(tiny_vllm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("registry")
    publish_repo(root, "acme/tiny-vllm", tiny_vllm_dir)
    with start_registry(root) as registry:
        config = structure_config(
            {
                "name": "tp",
                "sources": {
                    "huggingface": {
                        "endpoint": registry.url,
                        "auth_env": "CORTEX_TEST_NO_TOKEN",
                        "cache_dir": str(tmp_path_factory.mktemp("cache")),
                    }
                },
                "devices": {"cpu": {"memory_mb": 2048}, "cpu:1": {"memory_mb": 2048}},
            },
            NeuronConfig,
            "test neuron.toml",
        )
        registry_plugins = get_registry()
        resolver = SourceResolver.from_config(config, registry_plugins.source_plugins())
        harnesses = [h for h in registry_plugins.harnesses() if h.name == "vllm"]
        devices = [Device("cpu", i, f"cpu{i}", 8 * 2**30, 8 * 2**30) for i in range(2)]
        node = Node.build(config, harnesses, devices, resolver)
        server = UvicornThread(make_app(node, drain_seconds=1)).start()
        try:
            yield server.url
        finally:
            server.stop()
            node.workers.stop()


def test_a_model_over_two_cpu_devices_serves_and_unloads(neuron: str, tiny_vllm_dir: Path) -> None:
    response = httpx.post(
        f"{neuron}/models/load",
        json={"model_id": "acme/tiny-vllm", "devices": 2, "max_batch": 4},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    entry = response.json()["model"]
    assert entry["harness"] == "vllm"
    assert entry["devices"] == ["cpu", "cpu:1"]
    devices = {d["key"]: d for d in httpx.get(f"{neuron}/discovery").json()["devices"]}
    assert devices["cpu:1"]["reserved_by"] == "huggingface:acme/tiny-vllm"
    share = entry["memory_bytes"] // 2
    assert devices["cpu"]["free_memory"] == 2048 * 2**20 - share

    from vllm import LLM, SamplingParams

    prompt = [5, 6, 7, 8, 9]
    reply = httpx.post(
        f"{neuron}/v1/completions",
        json={"model": "acme/tiny-vllm", "prompt": prompt, "max_tokens": 12, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["text"]
    unloaded = httpx.post(
        f"{neuron}/models/unload", json={"model_id": "acme/tiny-vllm"}, timeout=120
    )
    assert unloaded.status_code == 200
    devices = {d["key"]: d for d in httpx.get(f"{neuron}/discovery").json()["devices"]}
    assert devices["cpu:1"]["reserved_by"] is None

    llm = LLM(
        model=str(tiny_vllm_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=16 * 2**20,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=12)
        output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert text == output.outputs[0].text
    finally:
        llm.llm_engine.engine_core.shutdown()
