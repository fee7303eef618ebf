"""TLS on both hops (issue 22), with certificates this test makes (cortex.testing.tls): clients
reach the gateway over HTTPS, the gateway reaches neurons over HTTPS and verifies them against
the configured CA, optionally presenting a client certificate that neurons require. Nothing falls
back to plain text: a neuron whose certificate does not verify is down."""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.config import NeuronTls
from cortex.testing.servers import ProcessServer, python_program
from cortex.testing.tls import TestCA

from .conftest import ECHO

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "tls")


def tls_neuron(parts, ca: TestCA, name: str, require_client_cert: bool = False) -> ProcessServer:
    issued = ca.issue(f"neuron-{name}")
    tls = {"certfile": str(issued.certfile), "keyfile": str(issued.keyfile)}
    if require_client_cert:
        tls["client_ca_file"] = str(ca.certfile)
    neuron = parts.neuron_process(name, tls=tls)
    assert neuron.url.startswith("https://127.0.0.1:"), neuron.text
    return neuron


def verifying(ca: TestCA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """An SSL context trusting ``ca``, presenting ``cert`` (a client certificate) when given."""
    context = ssl.create_default_context(cafile=str(ca.certfile))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def load_over_tls(url: str, ca: TestCA, cert: tuple[Path, Path] | None = None) -> None:
    with httpx.Client(verify=verifying(ca, cert), timeout=60) as client:
        answer = client.post(f"{url}/models/load", json={"model_id": ECHO})
    assert answer.status_code == 200, answer.text


@pytest.fixture
def https_fleet(parts, ca: TestCA, tmp_path: Path) -> Iterator[tuple[ProcessServer, TestCA]]:
    """``cortex serve`` over HTTPS in front of a ``neuron run`` over HTTPS that requires the
    gateway's client certificate; both real processes."""
    neuron = tls_neuron(parts, ca, "p1", require_client_cert=True)
    client_cert = ca.issue("gateway-client", client=True)
    load_over_tls(neuron.url, ca, (client_cert.certfile, client_cert.keyfile))
    served = ca.issue("gateway")
    (tmp_path / "cortex.toml").write_text(
        '[gateway]\npoll_interval = "200ms"\n\n'
        f'[gateway.tls]\ncertfile = "{served.certfile}"\nkeyfile = "{served.keyfile}"\n\n'
        f'[neuron_tls]\nca_file = "{ca.certfile}"\n'
        f'certfile = "{client_cert.certfile}"\nkeyfile = "{client_cert.keyfile}"\n\n'
        f'[[neurons]]\nname = "p1"\nendpoint = "{neuron.url}"\n'
    )
    argv = python_program(
        "cortex.cli", "cortex", "serve", "-c", str(tmp_path / "cortex.toml"),
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    with ProcessServer(argv, env={"CORTEX_PLUGINS": ""}) as gateway:
        yield gateway, ca


def test_https_end_to_end_with_a_client_certificate_to_the_neuron(https_fleet) -> None:
    gateway, ca = https_fleet
    assert gateway.url.startswith("https://127.0.0.1:"), gateway.text
    http = httpx.Client(verify=verifying(ca), timeout=30)
    # The gateway verified the neuron (cluster CA) and presented its client certificate.
    deadline = time.monotonic() + 15
    while ECHO not in {m["id"] for m in http.get(f"{gateway.url}/v1/models").json()["data"]}:
        assert time.monotonic() < deadline, gateway.text
        time.sleep(0.1)
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, http_client=http
    )
    reply = client.chat.completions.create(model=ECHO, messages=HELLO)
    assert reply.choices[0].message.content == "hello"
    chunks = client.chat.completions.create(model=ECHO, messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    # Plain HTTP on the TLS port is not served, and an unverified client refuses the server.
    with pytest.raises(httpx.HTTPError):
        httpx.get(gateway.url.replace("https://", "http://") + "/health", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gateway.url}/health", timeout=5)  # system trust store: not our CA


def test_a_neuron_that_requires_a_client_certificate_refuses_callers_without_one(
    parts, ca: TestCA
) -> None:
    neuron = tls_neuron(parts, ca, "p2", require_client_cert=True)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{neuron.url}/health", verify=verifying(ca), timeout=5)
    # A gateway that trusts the CA but has no client certificate: the neuron stays down.
    gw = parts.gateway({"p2": neuron.url}, neuron_tls=NeuronTls(ca_file=str(ca.certfile)))
    status = _wait_for_poll(gw)
    assert status["nodes"][0]["up"] is False and status["nodes"][0]["last_error"], status


def test_a_neuron_certificate_that_does_not_verify_means_down_not_plain_text(
    parts, ca: TestCA, tmp_path: Path
) -> None:
    neuron = tls_neuron(parts, ca, "p3")
    load_over_tls(neuron.url, ca)
    # No ca_file: the system trust store does not know the test CA.
    untrusting = parts.gateway({"p3": neuron.url})
    status = _wait_for_poll(untrusting)
    assert status["nodes"][0]["up"] is False, status
    assert "certificate" in json.dumps(status).lower() or "ssl" in json.dumps(status).lower()
    # Trusting the CA: up, and serving.
    trusting = parts.gateway({"p3": neuron.url}, neuron_tls=NeuronTls(ca_file=str(ca.certfile)))
    trusting.wait_for(lambda: trusting.node_up("p3"), timeout=15)
    trusting.wait_for(lambda: ECHO in trusting.catalogue(), timeout=15)
    answer = httpx.post(
        f"{trusting.url}/v1/chat/completions", json={"model": ECHO, "messages": HELLO}, timeout=30
    )
    assert answer.status_code == 200, answer.text


def _wait_for_poll(gw) -> dict:
    time.sleep(1.0)  # several polls at 0.2 s
    return httpx.get(f"{gw.url}/admin/status", timeout=10).json()


def test_tls_settings_need_both_files(tmp_path: Path) -> None:
    from cortex.config import ConfigError, load_cortex_config, load_neuron_config

    (tmp_path / "c.toml").write_text('[gateway.tls]\ncertfile = "a.pem"\n')
    with pytest.raises(ConfigError, match="certfile and keyfile go together"):
        load_cortex_config(tmp_path / "c.toml")
    (tmp_path / "n.toml").write_text('[tls]\nclient_ca_file = "ca.pem"\n')
    with pytest.raises(ConfigError, match="client_ca_file needs certfile"):
        load_neuron_config(tmp_path / "n.toml")
    assert sys.version_info >= (3, 11)
