"""``neuron run`` as a real process: the example config, the listening line, SIGTERM drain."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from cortex.testing.registry import RunningRegistry
from cortex.testing.servers import ProcessServer, python_program

REPO_ROOT = Path(__file__).resolve().parents[2]


def neuron_process(config: Path, *extra: str) -> ProcessServer:
    args = python_program(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0", *extra
    )
    return ProcessServer(args, env={"CORTEX_TEST_NO_TOKEN": ""})


def test_neuron_runs_with_the_example_config() -> None:
    with neuron_process(REPO_ROOT / "neuron.example.toml") as server:
        assert server.url is not None
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "ok"
        discovery = httpx.get(f"{server.url}/discovery", timeout=30).json()
        cpu = next(d for d in discovery["devices"] if d["key"] == "cpu")
        assert cpu["total_memory"] == 8192 * 2**20  # [devices."cpu"] memory_mb of the example
        assert httpx.get(f"{server.url}/models", timeout=10).json() == {"models": []}


def test_bad_config_exits_2_with_a_message(tmp_path: Path) -> None:
    import subprocess

    config = tmp_path / "neuron.toml"
    config.write_text('listen = "127.0.0.1:0"\nlisen = 1\n')
    args = python_program("cortex.cli", "neuron", "run", "-c", str(config))
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "lisen" in result.stderr and "unknown key" in result.stderr


def test_sigterm_drains_in_flight_streams_then_exits_0(
    model_registry: RunningRegistry, tmp_path: Path
) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(
        f"""
name = "drainer"
[sources.huggingface]
endpoint = "{model_registry.url}"
auth_env = "CORTEX_TEST_NO_TOKEN"
cache_dir = "{tmp_path / "cache"}"

[[default_models]]
id = "acme/slow-echo"
"""
    )
    server = neuron_process(config, "--drain-seconds", "20").start()
    try:
        url = server.url
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["default_models"]["ready"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        frames: list[str] = []
        got_some = threading.Event()

        def stream() -> None:
            body = {"model": "acme/slow-echo", "messages": [{"role": "user", "content": "go"}]}
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        frames.append(line)
                        if len(frames) == 3:
                            got_some.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert got_some.wait(20)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        reader.join(30)
        # the stream in flight ran to its end
        assert frames[-1] == "data: [DONE]"
        assert sum(1 for f in frames if '"content":' in f) >= 80
        assert server.proc.wait(30) == 0
        assert "neuron stopped" in server.text
        assert "unloaded huggingface:acme/slow-echo" in server.text
    finally:
        server.kill()
