"""The proxies under comparison, each started as its own process in front of one upstream URL:
cortex (``cortex serve``), LiteLLM's proxy (its own venv) and nginx (the floor).

Every starter returns a :class:`Proxy` with the base URL clients use, the pid whose process tree is
charged for CPU, and a stop function; a proxy that cannot be had on this machine raises
:class:`Unavailable` with the reason, which the benchmark prints and records instead of a number.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx

from benchmarks.common import ROOT, wait_port
from cortex.testing.servers import ProcessServer, free_port

LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_KEY = "sk-bench"


class Unavailable(RuntimeError):
    """This proxy cannot run here (not installed, failed to start); the message says why."""


@attrs.define
class Proxy:
    name: str
    base_url: str  # clients POST to base_url + "/v1/chat/completions"
    pid: int | None
    stop: Callable[[], None]
    key: str = "x"


def direct(upstream: str, pid: int | None) -> Proxy:
    return Proxy("direct", upstream, pid, lambda: None)


def cortex(neuron_url: str, name: str = "cortex", pythonpath: str | None = None) -> Proxy:
    """``cortex serve`` with one neuron. ``pythonpath`` prepends a folder (e.g. one holding
    httptools and uvloop, which uvicorn then picks up) without touching the venv."""
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    server = ProcessServer(
        [
            sys.executable,
            "-m",
            "cortex.cli",
            "cortex",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--neuron",
            f"up={neuron_url}",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tempfile.mkdtemp(prefix="bench-cortex-"),  # no stray ./cortex.toml is picked up
    ).start()
    assert server.url is not None and server.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the poller has seen the neuron
        health = httpx.get(f"{server.url}/health", timeout=5).json()
        if health.get("nodes_up") == 1 and health.get("models_ready", 0) >= 1:
            break
        time.sleep(0.1)
    else:
        server.terminate()
        raise Unavailable(f"cortex did not see the upstream neuron: {health}")
    return Proxy(name, server.url, server.proc.pid, server.terminate)


NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{ server {upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def _stopper(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    return stop


def nginx(upstream: str) -> Proxy:
    """nginx as a plain reverse proxy (one worker, buffering off, upstream keep-alive)."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        raise Unavailable("nginx is not installed (apt-get install -y nginx)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    port = free_port()
    host_port = upstream.removeprefix("http://").rstrip("/")
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, upstream=host_port, port=port))
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, 15)
    except TimeoutError:
        _stopper(proc)()
        log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
        raise Unavailable(f"nginx did not start: {log[-500:]}") from None
    return Proxy("nginx", f"http://127.0.0.1:{port}", proc.pid, _stopper(proc))


LITELLM_CONFIG = """
model_list:
  - model_name: bench/fake
    litellm_params:
      model: openai/bench/fake
      api_base: {upstream}/v1
      api_key: none
general_settings:
  master_key: {key}
litellm_settings:
  telemetry: false
"""


def ensure_litellm() -> Path:
    """benchmarks/.venv-litellm with ``litellm[proxy]`` (created on first use)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
            check=True,
            timeout=1200,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"could not install litellm[proxy] into {LITELLM_VENV}: {exc}") from None
    if not binary.exists():
        raise Unavailable(f"litellm[proxy] installed but {binary} is missing")
    return binary


def litellm(upstream: str) -> Proxy:
    """LiteLLM's proxy, one worker, the upstream as an OpenAI-compatible backend."""
    binary = ensure_litellm()
    tmp = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    (tmp / "config.yaml").write_text(LITELLM_CONFIG.format(upstream=upstream, key=LITELLM_KEY))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": LITELLM_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "NO_PROXY": "*",
    }
    log = (tmp / "litellm.log").open("wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "--config",
            str(tmp / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"litellm exited: {(tmp / 'litellm.log').read_text()[-800:]}")
        try:
            if (
                httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        _stopper(proc)()
        raise Unavailable("litellm did not start within 180 s")
    return Proxy("litellm", f"http://127.0.0.1:{port}", proc.pid, _stopper(proc), LITELLM_KEY)
