"""End to end with the torch harness, and ``cortex serve`` as a real process."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import openai
import pytest

from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet
from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program

HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.slow
def test_torch_model_end_to_end_through_the_gateway(fleet: Fleet, tiny_llama_dir: Path) -> None:
    publish_repo(fleet.registry.root, "acme/tiny-llama", tiny_llama_dir)
    gw = fleet.gateway(
        models=[ModelProfile(id="acme/tiny-llama", harness="torch", memory_mb=200)],
        aliases={"tiny": "acme/tiny-llama"},
    )
    client = gw.client(timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0
    )
    reply = raw.parse()
    assert reply.model == "tiny"
    assert raw.headers["x-cortex-model"] == "huggingface:acme/tiny-llama"
    assert reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length"
    node = raw.headers["x-cortex-node"]
    assert fleet.neuron_models(node)["huggingface:acme/tiny-llama"]["harness"] == "torch"
    # Streaming from the same replica: deltas add up to the greedy answer.
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


def test_cortex_serve_process_with_metrics(fleet: Fleet, tmp_path: Path) -> None:
    model = fleet.publish_echo("cli/echo", reply="from the cli", memory_mb=10)
    (tmp_path / "models.toml").write_text(
        '[[models]]\nid = "cli/echo"\nmemory_mb = 10\n\n[aliases]\n"cli" = "cli/echo"\n'
    )
    neurons = "".join(
        f'[[neurons]]\nname = "{name}"\nendpoint = "{fleet.neuron_url(name)}"\n\n'
        for name in fleet.neurons
    )
    (tmp_path / "cortex.toml").write_text(
        f'models_config = "models.toml"\n\n[gateway]\npoll_interval = "200ms"\n\n{neurons}'
    )
    argv = python_program(
        "cortex.cli",
        "cortex",
        "serve",
        "-c",
        str(tmp_path / "cortex.toml"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    )
    with ProcessServer(argv, env={"CORTEX_PLUGINS": ""}) as server:
        metrics_url = re.search(r"metrics on (http://\S+)", server.text).group(1)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert "cli" in [m.id for m in client.models.list().data]
        raw = client.chat.completions.with_raw_response.create(model="cli", messages=HELLO)
        reply, reply_node = raw.parse(), raw.headers["x-cortex-node"]
        assert reply.choices[0].message.content == "from the cli"
        streamed = client.chat.completions.create(model="cli", messages=HELLO, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == "from the cli"
        assert reply.model == "cli"
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["nodes_up"] == 3
        exposition = httpx.get(metrics_url, timeout=10).text
        assert 'cortex_node_up{node="n1"} 1.0' in exposition
        assert (
            f'cortex_requests_total{{model="{model}",node="{reply_node}",'
            'route="/v1/chat/completions",status="ok"} 2.0' in exposition
        )
        assert (
            f'cortex_cold_loads_total{{model="{model}",node="{reply_node}",outcome="ok"}} 1.0'
            in exposition
        )
        assert "cortex_time_to_first_token_seconds_bucket" in exposition
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
