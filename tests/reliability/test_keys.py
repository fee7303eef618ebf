"""Keys: gateway API keys (env and hashed file), the admin key, the neuron token, and that no
secret ever shows up in a log line, an error message, ``/discovery`` or a metric."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client import generate_latest

from cortex.auth import (
    GatewayAuth,
    KeySet,
    hash_key,
    is_loopback,
    presented_key,
    read_key_file,
    warn_if_exposed,
    without_credentials,
)
from cortex.config import AuthSection, ConfigError, ModelProfile
from cortex.testing.servers import ProcessServer, python_program

from .conftest import ECHO, load

CLIENT_KEY = "ck-client-3f9a1c-secret-value"
ADMIN_KEY = "ck-admin-77e2b0-secret-value"
NEURON_TOKEN = "nt-cluster-51d3aa-secret-value"
SECRETS = (CLIENT_KEY, ADMIN_KEY, NEURON_TOKEN)
HELLO = [{"role": "user", "content": "hello"}]
CLIENT_LOGGERS = ("httpx", "httpcore", "openai", "anthropic")


# ---- units ----------------------------------------------------------------------------------


def test_key_set_matches_only_its_keys() -> None:
    keys = KeySet.from_keys(["a-key", "b-key"])
    assert keys.matches("a-key") and keys.matches("b-key")
    assert not keys.matches("a-ke") and not keys.matches("") and not keys.matches(None)
    assert not KeySet().matches("a-key")
    assert "a-key" not in repr(keys)


def test_presented_key_reads_both_header_forms() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer   abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic Zm9v"}) is None
    assert presented_key({}) is None
    forwarded = without_credentials(
        {"Authorization": "Bearer k", "X-Api-Key": "k", "x-cortex-token": "t", "accept": "*/*"}
    )
    assert forwarded == {"accept": "*/*"}


def test_key_file_holds_hashes_and_refuses_plain_keys(tmp_path: Path) -> None:
    good = tmp_path / "keys.txt"
    good.write_text(f"# clients\n{hash_key(CLIENT_KEY)} alice\n\n{hash_key('other')}  # bob\n")
    assert len(read_key_file(good)) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{hash_key('x')}\n{CLIENT_KEY}\n")
    with pytest.raises(ConfigError) as info:
        read_key_file(bad)
    assert "line 2" in str(info.value) and CLIENT_KEY not in str(info.value)


def test_auth_config_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CORTEX_TEST_UNSET_KEYS"):
        GatewayAuth.from_config(AuthSection(keys_env="CORTEX_TEST_UNSET_KEYS"), tmp_path, {})
    with pytest.raises(ConfigError, match="required"):
        GatewayAuth.from_config(AuthSection(required=True), tmp_path, {})
    auth = GatewayAuth.from_config(AuthSection(), tmp_path, {})
    assert not auth.enabled and auth.check("/v1/models", {}) is None


def test_keys_hash_command_matches_the_library() -> None:
    done = subprocess.run(
        python_program("cortex.cli", "cortex", "keys", "hash", "--label", "ci"),
        input=f"{CLIENT_KEY}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{hash_key(CLIENT_KEY)} ci"
    assert CLIENT_KEY not in done.stdout + done.stderr
    new = subprocess.run(
        python_program("cortex.cli", "cortex", "keys", "new"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = new.stdout.splitlines()[0].split()[-1]
    assert new.stdout.splitlines()[1].split()[-1] == hash_key(key)


def test_loopback_is_open_and_anything_else_warns(caplog: pytest.LogCaptureFixture) -> None:
    off = GatewayAuth(KeySet(), KeySet(), required=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    with caplog.at_level(logging.WARNING):
        assert not warn_if_exposed("127.0.0.1", off)
        assert warn_if_exposed("0.0.0.0", off)
        on = GatewayAuth(KeySet.from_keys(["k"]), KeySet(), required=True)
        assert not warn_if_exposed("0.0.0.0", on)
    assert "AUTH IS OFF" in caplog.text


def test_serve_warns_loudly_on_a_public_listener_without_keys() -> None:
    argv = python_program(
        "cortex.cli", "cortex", "serve", "--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"
    )
    with ProcessServer(argv) as server:
        assert "AUTH IS OFF" in server.text


def test_serve_refuses_a_missing_key_variable(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text('[auth]\nkeys_env = "CORTEX_TEST_KEYS_NOT_SET"\n')
    done = subprocess.run(
        python_program(
            "cortex.cli", "cortex", "serve", "-c", str(config), "--listen", "127.0.0.1:0"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "CORTEX_TEST_KEYS_NOT_SET" in done.stderr and "Traceback" not in done.stderr


def test_neuron_refuses_to_start_without_its_token(parts) -> None:
    with pytest.raises(ConfigError, match="CORTEX_TEST_TOKEN_NOT_SET"):
        parts.neuron("n1", token_env="CORTEX_TEST_TOKEN_NOT_SET")


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture
def secured(
    parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A neuron that needs the token and a gateway with client keys (env), admin keys (hashed
    file) and the neuron token, with one echo model loaded. Logs are captured from the start."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CORTEX_TEST_KEYS", f"ck-unused-other-key, {CLIENT_KEY}")
    monkeypatch.setenv("CORTEX_TEST_NEURON_TOKEN", NEURON_TOKEN)
    admin_file = tmp_path / "admin-keys.txt"
    admin_file.write_text(f"{hash_key(ADMIN_KEY)} operator\n")
    neuron = parts.neuron("n1", token_env="CORTEX_TEST_NEURON_TOKEN")
    load(neuron.url, ECHO, headers={"x-cortex-token": NEURON_TOKEN})
    auth = AuthSection(
        keys_env="CORTEX_TEST_KEYS",
        admin_keys_file=str(admin_file),
        neuron_token_env="CORTEX_TEST_NEURON_TOKEN",
    )
    profile = [ModelProfile(id="acme/echo", memory_mb=10)]
    gateway = parts.gateway({"n1": neuron.url}, models=profile, auth=auth)
    return neuron, gateway


def _openai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_gateway_keys_in_both_envelopes_and_header_forms(secured) -> None:
    _neuron, gw = secured
    # Without a key, or with a wrong one: 401 in the OpenAI envelope.
    with pytest.raises(openai.AuthenticationError) as info:
        _openai(gw.url, "ck-wrong").chat.completions.create(model=ECHO, messages=HELLO)
    assert info.value.body["code"] == "invalid_api_key"
    bare = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": ECHO, "messages": HELLO})
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert bare.json()["error"]["type"] == "authentication_error"
    # /v1/messages answers in the Anthropic envelope (the SDK maps it to its own exception).
    client = anthropic.Anthropic(base_url=gw.url, api_key="ck-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as ainfo:
        client.messages.create(model=ECHO, max_tokens=8, messages=HELLO)
    assert ainfo.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }
    # The anthropic SDK sends its key as x-api-key.
    good = anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)
    message = good.messages.create(model=ECHO, max_tokens=8, messages=HELLO)
    assert message.content[0].text == "hello"
    # The right key as a Bearer token (openai SDK) and as x-api-key (raw).
    reply = _openai(gw.url, CLIENT_KEY).chat.completions.create(model=ECHO, messages=HELLO)
    assert reply.choices[0].message.content == "hello"
    raw = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": ECHO, "messages": HELLO},
        headers={"x-api-key": CLIENT_KEY},
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    # /health stays open for probes.
    assert httpx.get(f"{gw.url}/health").status_code == 200


def test_admin_routes_need_the_admin_key(secured) -> None:
    neuron, gw = secured
    url = f"{gw.url}/admin/models"
    assert httpx.get(url).status_code == 401
    as_client = httpx.get(url, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert as_client.status_code == 403
    assert as_client.json()["error"]["code"] == "admin_key_required"
    admin = {"x-api-key": ADMIN_KEY}
    as_admin = httpx.get(url, headers=admin)
    assert as_admin.status_code == 200
    assert [n["name"] for n in as_admin.json()["nodes"]] == ["n1"]
    # Load and unload through the gateway: admin keys only.
    for path in ("/admin/models/unload", "/admin/models/load"):
        body = {"model": "acme/echo"}
        refused = httpx.post(f"{gw.url}{path}", json=body, headers={"x-api-key": CLIENT_KEY})
        assert refused.status_code == 403
    done = httpx.post(f"{gw.url}/admin/models/unload", json=body, headers=admin, timeout=30)
    assert done.json() == {"model": ECHO, "unloaded_from": ["n1"]}
    token = {"x-cortex-token": NEURON_TOKEN}
    assert httpx.get(f"{neuron.url}/models", headers=token).json()["models"] == []
    done = httpx.post(f"{gw.url}/admin/models/load", json=body, headers=admin, timeout=60)
    assert done.json() == {"model": ECHO, "nodes": ["n1"], "loaded": True}, done.text
    missing = httpx.post(
        f"{gw.url}/admin/models/load", json={"model": "nobody/knows"}, headers=admin
    )
    assert missing.status_code == 404
    # The admin key also works on the client routes (an operator's smoke test).
    reply = _openai(gw.url, ADMIN_KEY).chat.completions.create(model=ECHO, messages=HELLO)
    assert reply.choices[0].message.content == "hello"


def test_neuron_refuses_calls_without_the_token(secured) -> None:
    neuron, _gw = secured
    assert httpx.get(f"{neuron.url}/health").status_code == 200
    for method, path, body in (
        ("GET", "/models", None),
        ("GET", "/discovery", None),
        ("POST", "/models/load", {"model_id": ECHO}),
        ("POST", "/models/unload", {"model_id": ECHO}),
        ("POST", "/v1/chat/completions", {"model": ECHO, "messages": HELLO}),
        ("POST", "/v1/completions", {"model": ECHO, "prompt": "hi"}),
    ):
        for headers in (
            {},
            {"x-cortex-token": "nt-wrong"},
            {"authorization": f"Bearer {CLIENT_KEY}"},
        ):
            answer = httpx.request(method, f"{neuron.url}{path}", json=body, headers=headers)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert answer.json()["error"]["code"] == "invalid_neuron_token"
    ok = httpx.get(f"{neuron.url}/models", headers={"authorization": f"Bearer {NEURON_TOKEN}"})
    assert ok.status_code == 200 and ECHO in ok.text


def test_no_secret_in_logs_errors_discovery_or_metrics(
    secured, caplog: pytest.LogCaptureFixture
) -> None:
    neuron, gw = secured
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for key in (CLIENT_KEY + "x", NEURON_TOKEN, ADMIN_KEY[:-1], "x"):
            for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
                answer = httpx.post(
                    f"{gw.url}/v1/chat/completions",
                    json={"model": ECHO, "messages": HELLO},
                    headers=headers,
                )
                seen.append(answer.text + str(answer.headers))
        good = {"authorization": f"Bearer {CLIENT_KEY}"}
        for body in ({"model": "nobody/knows", "messages": HELLO}, {"model": ECHO}):
            seen.append(httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=good).text)
        stream = _openai(gw.url, CLIENT_KEY).chat.completions.create(
            model=ECHO, messages=HELLO, stream=True
        )
        seen.append("".join(c.model_dump_json() for c in stream))
        token = {"x-cortex-token": NEURON_TOKEN}
        seen.append(httpx.get(f"{neuron.url}/discovery", headers=token).text)
        seen.append(httpx.get(f"{neuron.url}/metrics", headers=token).text)
        seen.append(httpx.get(f"{neuron.url}/models", headers=token).text)
        seen.append(httpx.get(f"{neuron.url}/models").text)
        seen.append(httpx.get(f"{gw.url}/health").text)
        seen.append(httpx.get(f"{gw.url}/v1/models", headers=good).text)
        seen.append(generate_latest(gw.gateway.metrics.registry).decode())
    # Every server-side record (the clients' own debug logs show what the test sent them).
    records = caplog.get_records("setup") + caplog.get_records("call")
    server_records = [r for r in records if not r.name.startswith(CLIENT_LOGGERS)]
    assert any(r.name.startswith(("cortex", "uvicorn")) for r in server_records)
    seen.extend(f"{r.getMessage()} {r.__dict__}" for r in server_records)
    everything = "\n".join(seen)
    assert "invalid_api_key" in everything and "cortex_requests" in everything
    for secret in SECRETS:
        assert secret not in everything
        assert secret[4:20] not in everything
