"""The gateway's hot-path choices hold in a real ``cortex serve``: uvloop and httptools are the
loop and HTTP parser it runs on (docs/benchmarks.md, section 1), and FastAPI's per-request
OpenTelemetry probe is off."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import httpx
import pytest

from cortex.config import CortexConfig, ModelsConfig
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.servers import ProcessServer, python_program

FAST_STACK = ("uvloop", "httptools")


@pytest.mark.skipif(
    not Path("/proc/self/maps").exists()
    or any(importlib.util.find_spec(m) is None for m in FAST_STACK),
    reason="needs /proc and uvloop + httptools installed",
)
def test_cortex_serve_runs_on_uvloop_and_httptools(tmp_path: Path) -> None:
    argv = python_program(
        "cortex.cli", "cortex", "serve", "--listen", "127.0.0.1:0", "--metrics-listen",
        "127.0.0.1:0", "--log-level", "warning",
    )  # fmt: skip
    with ProcessServer(argv, env={"CORTEX_PLUGINS": ""}, cwd=str(tmp_path)) as server:
        assert server.proc is not None
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/health").status_code == 200
            bad = client.post(
                "/v1/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            assert bad.status_code == 400
            assert bad.json()["error"]["type"] == "invalid_request_error"
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        loaded = {m for m in FAST_STACK if f"{os.sep}{m}{os.sep}" in maps}
        assert loaded == set(FAST_STACK), f"native modules mapped: {loaded}"


def test_fastapi_native_telemetry_is_off() -> None:
    app = create_app(Gateway(CortexConfig(), ModelsConfig(), load_strategy("lru")))
    telemetry = getattr(app, "_native_telemetry", None)
    if telemetry is None:
        pytest.skip("this FastAPI has no native telemetry")
    assert telemetry.enabled() is False
