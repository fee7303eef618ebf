"""The plugin inside a real ``neuron run`` process: configured in neuron.toml, models loaded from
the store over the neuron's HTTP API, answered through the official ``openai`` client.

The echo model (a built-in harness that needs no weights) keeps the first test fast; the second
loads a tiny random Llama with the torch harness, straight from the store without a copy.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.testing.servers import ProcessServer, python_program


def neuron_process(tmp_path: Path, store: Path) -> ProcessServer:
    """A ``neuron run`` serving ``store`` as the default source (not started yet)."""
    config = tmp_path / "neuron.toml"
    config.write_text(
        f"""
name = "local-test"
default_source = "local"

[sources.local]
endpoint = "file://{store}"

[devices."cpu"]
memory_mb = 2048
"""
    )
    argv = python_program(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"
    )
    return ProcessServer(argv, env={"CORTEX_CACHE": str(tmp_path / "cache")})


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    echo = root / "acme" / "echo"
    echo.mkdir(parents=True)
    (echo / "echo.json").write_text(json.dumps({"reply": "served from the local store"}))
    return root


@pytest.fixture
def neuron(tmp_path: Path, store: Path) -> Iterator[ProcessServer]:
    server = neuron_process(tmp_path, store).start()
    try:
        yield server
    finally:
        server.terminate()


def load(neuron: ProcessServer, model_id: str) -> httpx.Response:
    return httpx.post(f"{neuron.url}/models/load", json={"model_id": model_id}, timeout=120)


def test_neuron_loads_and_serves_a_model_from_the_store(neuron: ProcessServer) -> None:
    response = load(neuron, "acme/echo")  # bare id: default_source = "local"
    assert response.status_code == 200, response.text
    model = response.json()["model"]
    assert model["id"] == "local:acme/echo"
    assert model["state"] == "ready"
    assert model["harness"] == "echo"

    discovery = httpx.get(f"{neuron.url}/discovery", timeout=30).json()
    local = next(s for s in discovery["sources"] if s["scheme"] == "local")
    assert local["plugin"] == "local" and local["has_token"] is False

    client = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="local:acme/echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "served from the local store"


def test_neuron_reports_a_missing_repo_with_the_source_error(neuron: ProcessServer) -> None:
    response = load(neuron, "local:acme/missing")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "repo_not_found"
    assert error["details"]["kind"] == "repo_not_found"
    assert error["details"]["model_id"] == "local:acme/missing"


@pytest.mark.slow
def test_torch_harness_loads_safetensors_straight_from_the_store(
    tmp_path: Path, store: Path
) -> None:
    pytest.importorskip("cortex_harness_torch")
    from cortex.testing.tiny_models import build_tiny_model

    build_tiny_model(store / "acme" / "tiny-llama")
    with neuron_process(tmp_path, store) as neuron:
        response = load(neuron, "local:acme/tiny-llama")
        assert response.status_code == 200, response.text
        assert response.json()["model"]["harness"] == "torch"
        client = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="local:acme/tiny-llama",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            temperature=0,
        )
        assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 5
    # Nothing was copied into the neuron's caches.
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_neuron_pull_points_at_the_store_itself(tmp_path: Path, store: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(f'[sources.local]\nendpoint = "file://{store}"\n')
    pull = python_program("cortex.cli", "neuron", "pull", "-c", str(config), "--json")
    result = subprocess.run([*pull, "local:acme/echo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert pulled["snapshot"] == str((store / "acme" / "echo").resolve())
    assert pulled["download_bytes"] == 0
    missing = subprocess.run(
        [*pull, "local:acme/nope"], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode != 0
    assert json.loads(missing.stdout)["error"]["kind"] == "repo_not_found"
