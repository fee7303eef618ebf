"""What the fleet shows to whoever can reach it (issue 22): each default a deliberate choice,
documented in docs/security.md.

- ``/health`` (no key) answers in counts; node endpoints and connection errors are admin-only.
- Errors to clients say what went wrong without registry URLs, cache paths or neuron addresses;
  the admin API and the log keep them.
- The metrics port listens on loopback by default, takes a bearer token when configured, and the
  exposure warning names it.
- Slow or huge request headers are cut off before any route or key check (408 / 431).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cortex.auth import GatewayAuth, KeySet, warn_if_exposed
from cortex.config import CortexConfig, ModelProfile
from cortex.gateway.redact import public, public_message
from cortex.testing.servers import ProcessServer, UvicornThread, free_port, python_program
from cortex.wire.errors import ApiError

from .conftest import ECHO, load

HELLO = [{"role": "user", "content": "hello"}]
CLIENT_KEY = "ck-exposure-client-key"
METRICS_TOKEN = "mt-exposure-metrics-token"


# ---- /health ------------------------------------------------------------------------------------


def test_health_shows_counts_and_the_admin_api_the_network(parts) -> None:
    neuron = parts.neuron("n1")
    dead = f"http://127.0.0.1:{free_port()}"
    gw = parts.gateway({"n1": neuron.url, "gone": dead})
    gw.wait_for(lambda: gw.node_up("n1"), timeout=15)
    health = httpx.get(f"{gw.url}/health").json()
    assert health == {"status": "degraded", "nodes_up": 1, "nodes_total": 2, "models_ready": 0}
    text = httpx.get(f"{gw.url}/health").text
    assert "127.0.0.1" not in text and "gone" not in text
    status = httpx.get(f"{gw.url}/admin/status").json()
    gone = next(n for n in status["nodes"] if n["name"] == "gone")
    assert gone["endpoint"] == dead and gone["last_error"]


# ---- error bodies -------------------------------------------------------------------------------


def test_client_errors_name_no_registry_cache_or_neuron_address(parts, tmp_path: Path) -> None:
    """A load that fails because the registry is down: the client hears 'registry unreachable',
    the operator (admin API, log) hears which registry and which cache."""
    dead_registry = f"http://127.0.0.1:{free_port()}"
    cache = tmp_path / "private-cache-dir"
    neuron = parts.neuron(
        "n1",
        sources={
            "huggingface": {
                "endpoint": dead_registry,
                "auth_env": "CORTEX_TEST_NO_TOKEN",
                "cache_dir": str(cache),
            }
        },
    )
    gw = parts.gateway({"n1": neuron.url}, models=[ModelProfile(id=ECHO, memory_mb=10)])
    gw.wait_for(lambda: gw.node_up("n1"), timeout=15)
    seen = []
    for _ in range(2):  # the first waiter, and a request during the backoff
        answer = httpx.post(
            f"{gw.url}/v1/chat/completions", json={"model": ECHO, "messages": HELLO}, timeout=60
        )
        assert answer.status_code == 503, answer.text
        assert answer.headers.get("retry-after"), answer.headers
        error = answer.json()["error"]
        assert error["code"] == "registry_unreachable"
        assert "endpoint" not in error.get("details", {})
        seen.append(answer.text)
    seen.append(httpx.get(f"{gw.url}/v1/models").text)
    anthropic_answer = httpx.post(
        f"{gw.url}/v1/messages",
        json={"model": ECHO, "max_tokens": 8, "messages": HELLO},
        timeout=60,
    )
    assert anthropic_answer.status_code == 503
    seen.append(anthropic_answer.text)
    for text in seen:
        assert dead_registry not in text and "127.0.0.1" not in text, text
        assert str(cache) not in text and "private-cache-dir" not in text, text
    failed = httpx.get(f"{gw.url}/admin/status").json()["failed_loads"][ECHO]
    assert dead_registry in failed["message"] and str(cache) in failed["message"]


def test_upstream_errors_name_no_neuron_address(parts) -> None:
    neuron = parts.neuron("n1")
    load(neuron.url, ECHO)
    gw = parts.gateway({"n1": neuron.url})
    gw.wait_for(lambda: ECHO in gw.catalogue(), timeout=15)
    neuron.stop()  # the gateway still believes n1 serves it: the connect fails
    answer = httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": ECHO, "messages": HELLO}, timeout=30
    )
    assert answer.status_code in (502, 503), answer.text
    assert "127.0.0.1" not in answer.text and str(urlsplit(neuron.url).port) not in answer.text


@pytest.mark.parametrize(
    ("message", "hidden"),
    [
        ("registry http://10.1.2.3:8080/x is down; not in the cache /var/cache/cortex/hf", None),
        ("could not reach https://neuron-a.lan:13131/models/load: timeout", "neuron-a.lan"),
        ("Cannot connect to host neuron-b.lan:13131 ssl:default", "neuron-b.lan"),
        ("connect call failed ('192.168.0.7', 13131)", "192.168.0.7"),
        ("file ~/.cache/huggingface/hub/models--a--b/blobs/x missing", ".cache"),
        ("weights at C:\\models\\x.gguf", "models"),
        ("connect to [fd00::1]:13131 failed", "fd00"),
    ],
)
def test_public_messages_drop_urls_paths_and_hosts(message: str, hidden: str | None) -> None:
    shown = public_message(message)
    for secret in ("10.1.2.3", "/var/cache", "http", hidden or "never-matches-anything"):
        assert secret not in shown, shown


def test_public_messages_keep_what_a_client_needs() -> None:
    for message in (
        "model 'huggingface:acme/x' not found: not loaded anywhere and not in models.toml",
        "no route GET /v1/foo",
        "loading huggingface:acme/x failed: invalid echo.json: Expecting value: line 1",
        "huggingface:acme/x needs 300 MiB on cpu of node big, 20 MiB free",
    ):
        assert public_message(message) == message
    details = {"endpoint": "http://h/", "device": "cpu", "note": "in /var/x/y", "n": 3}
    error = ApiError(503, "registry_unreachable", "x http://h/ y", retry_after=3, details=details)
    shown = public(error)
    assert (shown.status, shown.code, shown.retry_after, shown.details) == (
        503,
        "registry_unreachable",
        3,
        {"device": "cpu", "note": "in [path]", "n": 3},
    )
    assert shown.message == "x [url] y"


# ---- the metrics port ---------------------------------------------------------------------------


def test_metrics_listen_defaults_to_loopback() -> None:
    assert CortexConfig().gateway.metrics_listen.startswith("127.0.0.1:")


def test_the_exposure_warning_names_the_metrics_port(caplog: pytest.LogCaptureFixture) -> None:
    off = GatewayAuth(KeySet(), KeySet(), required=False)
    on = GatewayAuth(KeySet.from_keys(["k"]), KeySet(), required=True)
    with caplog.at_level(logging.WARNING, logger="cortex.auth"):
        assert warn_if_exposed("0.0.0.0", off, "0.0.0.0", metrics_token=False)
    text = caplog.text
    assert "AUTH IS OFF" in text and "METRICS PORT IS OPEN" in text and "metrics_token_env" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cortex.auth"):
        assert warn_if_exposed("0.0.0.0", on, "0.0.0.0", metrics_token=False)
    assert "AUTH IS OFF" not in caplog.text and "METRICS PORT IS OPEN" in caplog.text
    assert not warn_if_exposed("0.0.0.0", on, "0.0.0.0", metrics_token=True)
    assert not warn_if_exposed("0.0.0.0", on, "127.0.0.1", metrics_token=False)


# ---- cortex serve as a process: metrics token, header limits -------------------------------------


@pytest.fixture
def served(parts, tmp_path: Path):
    """``cortex serve`` (a real process) with client keys, a metrics token, a 1 s header timeout
    and the default header size limit; in front of one in-process neuron."""
    neuron = parts.neuron("n1")
    (tmp_path / "cortex.toml").write_text(
        '[gateway]\npoll_interval = "200ms"\nheader_timeout = "1s"\n\n'
        '[auth]\nkeys_env = "EXPOSURE_KEYS"\nmetrics_token_env = "EXPOSURE_METRICS"\n\n'
        f'[[neurons]]\nname = "n1"\nendpoint = "{neuron.url}"\n'
    )
    argv = python_program(
        "cortex.cli", "cortex", "serve", "-c", str(tmp_path / "cortex.toml"),
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    env = {"CORTEX_PLUGINS": "", "EXPOSURE_KEYS": CLIENT_KEY, "EXPOSURE_METRICS": METRICS_TOKEN}
    with ProcessServer(argv, env=env) as server:
        yield server


def _metrics_url(server: ProcessServer) -> str:
    for line in server.text.splitlines():
        if line.startswith("metrics on "):
            return line.split()[-1]
    raise AssertionError(server.text)


def test_the_metrics_port_needs_its_token_when_one_is_configured(served) -> None:
    url = _metrics_url(served)
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
    assert httpx.get(url, headers={"authorization": f"Bearer {CLIENT_KEY}"}).status_code == 401
    answer = httpx.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200 and "cortex_requests_total" in answer.text


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def slowloris(url: str, connections: int, seconds: float) -> list[tuple[float, bytes]]:
    """``connections`` clients each sending a header line every 0.3 s, never finishing; returns
    (when the server closed, what it answered) per connection."""
    results: list[tuple[float, bytes]] = []
    lock = threading.Lock()
    started = time.monotonic()

    def client() -> None:
        sock = _connect(url)
        answer = b""
        try:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            for i in range(int(seconds / 0.3)):
                sock.sendall(b"X-Slow-%d: a\r\n" % i)
                time.sleep(0.3)
        except OSError:  # closed by the server: what we want
            pass
        answer = _read_all(sock)
        sock.close()
        with lock:
            results.append((time.monotonic() - started, answer))

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return results


def assert_headers_are_guarded(url: str, headers: dict[str, str], path: str) -> None:
    # 50 slow clients: each cut off after the 1 s header timeout with 408, none held for long,
    # and a normal request is served meanwhile.
    results = slowloris(url, 50, seconds=8.0)
    assert len(results) == 50
    for elapsed, answer in results:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert elapsed < 6.0, elapsed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    # A connection that sends nothing at all is closed too.
    idle = _connect(url)
    started = time.monotonic()
    assert _read_all(idle).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 5
    idle.close()
    # 100 KB of headers: 431 before any key check (a valid key does not help, none is needed).
    big = {"x-padding": "p" * 100_000}
    for extra in ({}, headers):
        answer = httpx.get(f"{url}{path}", headers={**big, **extra}, timeout=10)
        assert answer.status_code == 431, answer.status_code
    # Headers under the limit (32 KiB by default) are fine.
    assert httpx.get(f"{url}{path}", headers={"x-p": "p" * 20_000, **headers}).is_success


def test_gateway_cuts_off_slow_and_huge_headers(served) -> None:
    assert_headers_are_guarded(served.url, {"authorization": f"Bearer {CLIENT_KEY}"}, "/v1/models")


def test_neuron_cuts_off_slow_and_huge_headers(parts) -> None:
    neuron = parts.neuron_process("p1", header_timeout="1s")
    assert_headers_are_guarded(neuron.url, {}, "/models")


def leaky_neuron(discovery: dict, models: dict) -> FastAPI:
    """Answers the poller like a healthy neuron; every generation fails with an error that names
    a cache path, a registry URL and a host (as a harness or source error can)."""
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/discovery")(lambda: JSONResponse(discovery))
    app.get("/models")(lambda: JSONResponse(models))
    leak = {
        "error": {
            "message": "cannot read /srv/private/cache/models--acme--echo/blobs/x from "
            "http://10.9.8.7:8090/acme/echo (host 10.9.8.7:8090)",
            "type": "invalid_request_error",
            "param": None,
            "code": "harness_error",
            "details": {"endpoint": "http://10.9.8.7:8090", "file": "/srv/private/x"},
        }
    }
    for route in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        app.post(route)(lambda: JSONResponse(leak, status_code=422))
    return app


def test_relayed_neuron_errors_are_redacted_on_every_route(parts) -> None:
    real = parts.neuron("n1")
    load(real.url, ECHO)
    discovery = httpx.get(f"{real.url}/discovery").json()
    models = httpx.get(f"{real.url}/models").json()
    leaky = UvicornThread(leaky_neuron(discovery, models)).start()
    parts.stoppers.append(leaky.stop)
    gw = parts.gateway({"leaky": leaky.url})
    gw.wait_for(lambda: ECHO in gw.catalogue(), timeout=15)
    for route, body in (
        ("/v1/chat/completions", {"model": ECHO, "messages": HELLO}),
        ("/v1/completions", {"model": ECHO, "prompt": "x"}),
        ("/v1/messages", {"model": ECHO, "max_tokens": 8, "messages": HELLO}),
        ("/v1/responses", {"model": ECHO, "input": "x"}),
        ("/v1/messages/count_tokens", {"model": ECHO, "messages": HELLO}),
    ):
        answer = httpx.post(f"{gw.url}{route}", json=body, timeout=30)
        assert answer.status_code == 422, (route, answer.text)
        for secret in ("/srv/private", "10.9.8.7", "8090"):
            assert secret not in answer.text, (route, answer.text)
        assert "cannot read [path]" in answer.text, (route, answer.text)
