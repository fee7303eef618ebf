"""A device fault (issue 22): with the default ``on_device_fault = "exit"`` the neuron stops
taking work, lets what runs on its other devices finish, and exits with status 75 for systemd
(``Restart=on-failure``) to start a fresh process; it no longer stays half dead until someone
restarts it by hand. ``"stay"`` keeps the old behaviour (tests/neuron/test_lifecycle.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from cortex.neuron.node import EXIT_DEVICE_FAULT
from cortex.testing.servers import ProcessServer

from .conftest import ECHO, SLOW, neuron_settings, neuron_toml

HELLO = [{"role": "user", "content": "hello"}]
HERE = Path(__file__).resolve().parent


def test_a_device_fault_drains_the_neuron_and_exits_for_a_restart(registry, tmp_path) -> None:
    settings = neuron_settings("faulty", registry.url, tmp_path / "cache")
    config = tmp_path / "neuron.toml"
    config.write_text(neuron_toml(settings))
    trigger = tmp_path / "fault-now"
    argv = [sys.executable, str(HERE / "faulty_neuron.py"), str(config), "127.0.0.1:0", "10"]
    env = {"CORTEX_TEST_FAULT_TRIGGER": str(trigger), "CUDA_VISIBLE_DEVICES": ""}
    server = ProcessServer(argv, env=env).start()
    try:
        url = server.url
        for model, device in ((ECHO, "sim:0"), (SLOW, "cpu")):
            answer = httpx.post(
                f"{url}/models/load", json={"model_id": model, "device": device}, timeout=60
            )
            assert answer.status_code == 200, answer.text
        body = {"model": SLOW, "messages": HELLO, "stream": True, "max_tokens": 60}  # ~1.5 s
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(lines)
            trigger.touch()  # sim:0 faults while a request runs on the cpu
            deadline = time.monotonic() + 5
            while httpx.get(f"{url}/health", timeout=5).json()["status"] != "draining":
                assert time.monotonic() < deadline, "not draining after the fault"
                time.sleep(0.05)
            models = {m["id"]: m for m in httpx.get(f"{url}/models").json()["models"]}
            assert models[ECHO]["error"]["code"] == "device_poisoned"
            assert models[SLOW]["state"] == "failed"  # gateways send new requests elsewhere
            assert models[SLOW]["error"]["code"] == "neuron_restarting"
            refused = httpx.post(f"{url}/models/load", json={"model_id": ECHO}, timeout=10)
            assert refused.status_code == 503 and refused.headers.get("retry-after")
            text = "\n".join(lines)  # the running request is not cut
        assert "w59" in text and "[DONE]" in text, text[-300:]
        assert server.proc is not None
        code = server.proc.wait(timeout=30)
        assert code == EXIT_DEVICE_FAULT == 75, server.text
        assert "exiting with status 75" in server.text and "no request was cut" in server.text
    finally:
        server.kill()
