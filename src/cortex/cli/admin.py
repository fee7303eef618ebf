"""``cortex models``, ``cortex load``, ``cortex unload``: the gateway's ``/admin`` routes from a
terminal.

They talk to the gateway, never to neurons: the gateway places a load exactly as a request
would (profiles, free memory, eviction) and knows where a model is loaded. The admin key comes
from ``CORTEX_ADMIN_KEY`` or ``--admin-key-file`` (needed when the gateway has keys configured;
never from an argument, which ``ps`` and shell history would show) and is sent as
``Authorization: Bearer``; it is never printed. Failures end with a one-line reason on
stderr and a non-zero exit code, so scripts can warm a fleet with ``cortex load`` in a loop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from cortex.cli.console import console, human_bytes, table

DEFAULT_ENDPOINT = "http://127.0.0.1:31313"
ENDPOINT_ENV = "CORTEX_ENDPOINT"
ADMIN_KEY_ENV = "CORTEX_ADMIN_KEY"
# Loads can take minutes (a first fetch of a large model); the gateway bounds them itself.
LOAD_TIMEOUT = 3600.0


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class GatewayClient:
    """A few JSON calls to one gateway; every failure becomes a one-line reason and exit 1."""

    def __init__(self, endpoint: str, admin_key: str | None, timeout: float = 30.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(base_url=self.endpoint, headers=headers, timeout=timeout)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        try:
            answer = self.http.request(method, path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            fail(f"the gateway at {self.endpoint} did not answer {path} in {timeout:g}s")
        except httpx.HTTPError as exc:
            fail(f"cannot reach the gateway at {self.endpoint}: {type(exc).__name__}: {exc}")
        try:
            payload = answer.json()
        except ValueError:
            payload = None
        if answer.status_code >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            if isinstance(error, dict):
                reason = f"{error.get('code') or error.get('type')}: {error.get('message')}"
            else:
                reason = answer.text[:200] or answer.reason_phrase
            hint = ""
            if answer.status_code in (401, 403):
                hint = f" (set {ADMIN_KEY_ENV} or pass --admin-key-file)"
            fail(f"{path} answered {answer.status_code}: {reason}{hint}")
        if not isinstance(payload, dict):
            fail(f"{path} answered something that is not a JSON object")
        return payload


def _refuse_key_argument(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
    if value is not None:
        raise click.UsageError(
            f"--admin-key is not accepted: a key in an argument shows in 'ps' and in shell "
            f"history. Set {ADMIN_KEY_ENV}, or pass --admin-key-file PATH ('-' reads stdin)."
        )


def _admin_key(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """The admin key: the first line of ``--admin-key-file`` (``-``: stdin), else
    ``CORTEX_ADMIN_KEY``, else none."""
    if path is None:
        return os.environ.get(ADMIN_KEY_ENV) or None
    try:
        text = sys.stdin.read() if path == "-" else Path(path).expanduser().read_text()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise click.BadParameter(f"{path} holds no key")
    return key


def gateway_options(command: Any) -> Any:
    """``--endpoint`` and the admin key (``CORTEX_ADMIN_KEY`` or ``--admin-key-file``)."""
    command = click.option(
        "--admin-key-file",
        "admin_key",
        default=None,
        metavar="PATH",
        callback=_admin_key,
        help=f"A file holding the admin key ('-': stdin); default: ${ADMIN_KEY_ENV}. "
        "Needed when the gateway has keys configured; never printed.",
    )(command)
    command = click.option(
        "--admin-key",
        "refused_admin_key",
        default=None,
        hidden=True,
        expose_value=False,
        callback=_refuse_key_argument,
    )(command)
    return click.option(
        "--endpoint",
        envvar=ENDPOINT_ENV,
        default=DEFAULT_ENDPOINT,
        show_default=True,
        show_envvar=True,
        help="The gateway's URL.",
    )(command)


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True))


@click.command("models")
@gateway_options
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's JSON answer.")
def models(endpoint: str, admin_key: str | None, as_json: bool) -> None:
    """List the models the fleet serves: state, where they are loaded, context window, what
    they can do (chat, tools, logprobs, structured_output, embeddings), aliases.

    Example: cortex models --endpoint http://10.0.0.10:31313
    """
    payload = GatewayClient(endpoint, admin_key).call("GET", "/admin/models")
    entries = payload.get("models", [])
    if as_json:
        _print_json(entries)
        return
    rows = []
    for entry in entries:
        placed = entry.get("loaded_on") or []
        where = ", ".join(f"{p.get('node')}:{p.get('state', '?')}" for p in placed) or "-"
        note = ""
        if entry.get("alias_for"):
            note = f"alias for {entry['alias_for']}"
        elif isinstance(entry.get("error"), dict):
            note = f"{entry['error'].get('code')}: {entry['error'].get('message')}"
        context = entry.get("context_length")
        can_do = ", ".join(entry.get("capabilities") or []) or "-"
        rows.append(
            [
                entry.get("id", "?"),
                entry.get("state", "?"),
                where,
                str(context) if context else "-",
                can_do,
                note,
            ]
        )
    columns = ["model", "state", "loaded on", "context", "can do", "note"]
    console().print(table("models", columns, rows))


@click.command("load")
@click.argument("model")
@click.option("--node", default=None, help="Load on this node (default: where a request would).")
@gateway_options
def load(model: str, node: str | None, endpoint: str, admin_key: str | None) -> None:
    """Load MODEL (an id or an alias) through the gateway; waits until it is ready.

    Example: cortex load qwen/Qwen2.5-7B-Instruct --node big
    """
    body: dict[str, Any] = {"model": model}
    if node is not None:
        body["node"] = node
    client = GatewayClient(endpoint, admin_key)
    answer = client.call("POST", "/admin/models/load", body, timeout=LOAD_TIMEOUT)
    where = ", ".join(answer.get("nodes", []))
    if answer.get("loaded"):
        click.echo(f"loaded {answer.get('model')} on {where}")
    else:
        click.echo(f"{answer.get('model')} is already ready on {where}")


@click.command("unload")
@click.argument("model")
@click.option("--node", default=None, help="Unload from this node only (default: everywhere).")
@gateway_options
def unload(model: str, node: str | None, endpoint: str, admin_key: str | None) -> None:
    """Unload MODEL from every node where it is loaded (or only from --node).

    Example: cortex unload qwen/Qwen2.5-7B-Instruct --node big
    """
    body: dict[str, Any] = {"model": model}
    if node is not None:
        body["node"] = node
    answer = GatewayClient(endpoint, admin_key).call(
        "POST", "/admin/models/unload", body, timeout=300
    )
    click.echo(f"unloaded {answer.get('model')} from {', '.join(answer.get('unloaded_from', []))}")


__all__ = ["GatewayClient", "gateway_options", "human_bytes", "load", "models", "unload"]
