"""``cortex registry serve DIR`` as a real process."""

from __future__ import annotations

from pathlib import Path

import httpx

from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program


def test_serve_prints_url_and_requires_token(tmp_path: Path) -> None:
    publish_repo(tmp_path, "acme/tiny", {"config.json": b"{}"})
    args = python_program(
        "cortex.cli", "cortex", "registry", "serve", str(tmp_path),
        "--listen", "127.0.0.1:0", "--token-env", "MIRROR_TOKEN",
    )  # fmt: skip
    with ProcessServer(args, env={"MIRROR_TOKEN": "t0ken-value"}) as server:
        assert server.url is not None
        assert httpx.get(f"{server.url}/api/models/acme/tiny").status_code == 401
        ok = httpx.get(
            f"{server.url}/api/models/acme/tiny", headers={"Authorization": "Bearer t0ken-value"}
        )
        assert ok.status_code == 200
        assert ok.json()["id"] == "acme/tiny"
    assert "t0ken-value" not in server.text


def test_serve_refuses_an_empty_token_env(tmp_path: Path) -> None:
    args = python_program(
        "cortex.cli", "cortex", "registry", "serve", str(tmp_path), "--token-env", "UNSET_VAR_X"
    )
    server = ProcessServer(args, env={"UNSET_VAR_X": ""})
    try:
        server.start(timeout=30)
    except RuntimeError as exc:
        assert "UNSET_VAR_X" in str(exc)
    else:
        server.terminate()
        raise AssertionError("the registry started without its token")


def test_serve_guards_request_headers(tmp_path: Path) -> None:
    # The gateway's and the neuron's header limits (cortex.wire.guard), with their defaults: a
    # registry on 0.0.0.0 as a mirror is as exposed as they are. 100 KB of headers: 431.
    publish_repo(tmp_path, "acme/tiny", {"config.json": b"{}"})
    args = python_program(
        "cortex.cli", "cortex", "registry", "serve", str(tmp_path), "--listen", "127.0.0.1:0"
    )
    with ProcessServer(args) as server:
        assert server.url is not None
        url = f"{server.url}/api/models/acme/tiny"
        assert httpx.get(url, headers={"x-padding": "p" * 100_000}).status_code == 431
        assert httpx.get(url, headers={"x-padding": "p" * 20_000}).status_code == 200
