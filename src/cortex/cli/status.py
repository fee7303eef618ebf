"""``cortex status`` (the fleet, through the gateway) and ``neuron status`` (one node).

What an operator asks first: is every node up, how full is each device, which models are
where, is anything busy, loading, failing or being evicted. ``cortex status`` draws it from
one ``GET /admin/status`` answer; ``neuron status`` asks a neuron directly (``/health``,
``/discovery``, ``/models``), which works without a gateway. Both exit non-zero with a one-line
reason when the server cannot be reached, so they double as health checks in scripts.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click
import httpx

from cortex.cli.admin import ENDPOINT_ENV, GatewayClient, fail, gateway_options
from cortex.cli.console import console, human_bytes, human_seconds, memory_bar, table

NEURON_ENDPOINT_ENV = "CORTEX_NEURON_ENDPOINT"
DEFAULT_NEURON_ENDPOINT = "http://127.0.0.1:13131"
TOKEN_HEADER = "x-cortex-token"


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _device_state(d: dict[str, Any]) -> str:
    """A device's state, and the multi-device model it is reserved for, if any."""
    state = str(d.get("state", "ok"))
    return f"{state}, reserved: {d['reserved_by']}" if d.get("reserved_by") else state


def _model_devices(m: dict[str, Any]) -> str:
    """``cuda:0`` for a one-device model, ``cuda:0+cuda:1`` for one that spans two."""
    devices = m.get("devices")
    if isinstance(devices, list) and len(devices) > 1:
        return "+".join(str(d) for d in devices)
    return str(m.get("device") or "-")


def _devices_cell(devices: list[dict[str, Any]]) -> tuple[str, str]:
    names = "\n".join(f"{d.get('key')} ({_device_state(d)})" for d in devices) or "-"
    bars = "\n".join(
        memory_bar(int(d.get("used_bytes") or 0), int(d.get("total_bytes") or 0)) for d in devices
    )
    return names, bars or "-"


def _event_rows(events: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for e in events:
        at = time.strftime("%H:%M:%S", time.localtime(float(e.get("at") or 0)))
        took = e.get("duration_s")
        detail = e.get("outcome", "")
        if e.get("error"):
            detail += f" ({e['error']})"
        rows.append(
            [
                at,
                str(e.get("kind")),
                str(e.get("model")),
                str(e.get("node")),
                detail,
                f"{took:.1f}s" if isinstance(took, int | float) else "-",
            ]
        )
    return rows


KEY_COLUMNS = [
    "key",
    "models",
    "requests/min left",
    "tokens/min left",
    "budget used",
    "resets",
    "in-flight",
]


def _of(left: Any, limit: Any) -> str:
    return "-" if limit is None else f"{left} / {limit}"


def _key_row(k: dict[str, Any]) -> list[str]:
    """One key of ``/admin/status``: its name (never the key), models, what is left now."""
    budget = k.get("budget_tokens")
    return [
        str(k.get("name")),
        ", ".join(k.get("models") or []) or "any",
        _of(k.get("requests_remaining"), k.get("rpm")),
        _of(k.get("tokens_remaining"), k.get("tpm")),
        "-" if budget is None else f"{k.get('budget_used')} / {budget} per {k.get('per')}",
        str(k.get("budget_resets_at") or "-"),
        str(k.get("in_flight", 0)),
    ]


def render_fleet(endpoint: str, view: dict[str, Any]) -> None:
    out = console()
    nodes = view.get("nodes", [])
    models = view.get("models", [])
    up = sum(1 for n in nodes if n.get("up"))
    ready = sum(1 for m in models if m.get("state") == "ready")
    out.print(
        f"gateway {endpoint}: {view.get('status')} - {up}/{len(nodes)} nodes up, "
        f"{ready} model(s) ready"
    )
    node_rows = []
    for n in nodes:
        names, bars = _devices_cell(n.get("devices", []))
        state = "up" if n.get("up") else f"DOWN ({n.get('last_error') or 'no answer'})"
        node_rows.append([str(n.get("name")), state, names, bars])
    out.print(table("nodes", ["node", "state", "devices", "memory used / total"], node_rows))
    model_rows = [
        [
            str(m.get("id")),
            str(m.get("node")),
            _model_devices(m),
            str(m.get("state")),
            human_bytes(m.get("memory_bytes")),
            str(m.get("in_flight", 0)),
            human_seconds(m.get("idle_s")),
            _yes(bool(m.get("pinned"))),
            ", ".join(m.get("capabilities") or []) or "-",
        ]
        for m in models
    ]
    columns = [
        "model",
        "node",
        "device",
        "state",
        "memory",
        "in-flight",
        "idle",
        "pinned",
        "can do",
    ]
    out.print(table("models", columns, model_rows))
    loading = view.get("loads_in_progress") or []
    if loading:
        out.print(f"loading now: {', '.join(loading)}")
    for model, failure in (view.get("failed_loads") or {}).items():
        out.print(
            f"failed load: {model}: {failure.get('code')}: {failure.get('message')} "
            f"(attempts {failure.get('attempts')}, next try in {failure.get('retry_in')}s)"
        )
    keys = view.get("keys") or []
    if keys:
        out.print(table("keys", KEY_COLUMNS, [_key_row(k) for k in keys]))
    store = view.get("usage_store")
    if isinstance(store, dict) and not store.get("ok", True):
        out.print(
            f"usage store {store.get('store')}: {store.get('failed_syncs')} failed sync(s), "
            f"{store.get('pending_rows')} row(s) waiting: {store.get('last_error')}"
        )
    events = _event_rows(view.get("events") or [])
    columns = ["time", "event", "model", "node", "outcome", "took"]
    out.print(table("recent loads and evictions", columns, events or [["-"] * 6]))


@click.command("status")
@gateway_options
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's JSON answer.")
def status(endpoint: str, admin_key: str | None, as_json: bool) -> None:
    """Show the fleet: nodes (up/down, devices, memory), models (node, state, memory,
    in-flight, idle time, pinned) and recent loads and evictions. Exits 1 with a one-line
    reason when the gateway cannot be reached.

    Example: cortex status --endpoint http://10.0.0.10:31313
    """
    view = GatewayClient(endpoint, admin_key, timeout=10).call("GET", "/admin/status")
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
        return
    render_fleet(endpoint, view)


def _neuron_get(client: httpx.Client, endpoint: str, path: str) -> dict[str, Any]:
    try:
        answer = client.get(f"{endpoint}{path}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the neuron at {endpoint}: {type(exc).__name__}: {exc}")
    if answer.status_code >= 400:
        fail(f"{path} answered {answer.status_code}: {answer.text[:200]}")
    try:
        payload = answer.json()
    except ValueError:
        fail(f"{path} answered something that is not JSON")
    if not isinstance(payload, dict):
        fail(f"{path} answered something that is not a JSON object")
    return payload


def render_neuron(endpoint: str, health: dict[str, Any], discovery: dict, models: dict) -> None:
    out = console()
    out.print(
        f"neuron {health.get('node')} at {endpoint}: {health.get('status')} "
        f"(cortex {health.get('version')}, host {discovery.get('host')})"
    )
    device_rows = [
        [
            str(d.get("key")),
            str(d.get("kind")),
            _device_state(d),
            memory_bar(
                max(0, int(d.get("total_memory") or 0) - int(d.get("free_memory") or 0)),
                int(d.get("total_memory") or 0),
            ),
        ]
        for d in discovery.get("devices", [])
    ]
    out.print(table("devices", ["device", "kind", "state", "memory used / total"], device_rows))
    now = time.time()
    model_rows = []
    for m in models.get("models", []):
        last = max(float(m.get("last_used") or 0), float(m.get("loaded_at") or 0))
        error = m.get("error")
        model_rows.append(
            [
                str(m.get("id")),
                str(m.get("harness") or "-"),
                _model_devices(m),
                str(m.get("state")),
                human_bytes(m.get("memory_bytes")),
                str(m.get("in_flight", 0)),
                human_seconds(now - last) if last else "-",
                f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else "",
            ]
        )
    columns = ["model", "harness", "device", "state", "memory", "in-flight", "idle", "error"]
    out.print(table("models", columns, model_rows))
    harnesses = ", ".join(h.get("name", "?") for h in discovery.get("harnesses", []))
    sources = ", ".join(s.get("scheme", "?") for s in discovery.get("sources", []))
    out.print(f"harnesses: {harnesses or '-'}; sources: {sources or '-'}")


@click.command("status")
@click.option(
    "--endpoint",
    envvar=NEURON_ENDPOINT_ENV,
    default=DEFAULT_NEURON_ENDPOINT,
    show_default=True,
    show_envvar=True,
    help="The neuron's URL.",
)
@click.option(
    "--token-env",
    default=None,
    metavar="NAME",
    help="Environment variable holding the cluster token (neuron.toml token_env), if any.",
)
@click.option("--json", "as_json", is_flag=True, help="Print health, discovery and models.")
def neuron_status(endpoint: str, token_env: str | None, as_json: bool) -> None:
    """Show one neuron: health, devices with memory used/total, models with state, memory,
    in-flight and idle time. Exits 1 with a one-line reason when it cannot be reached.

    Example: neuron status --endpoint http://10.0.0.11:13131
    """
    endpoint = endpoint.rstrip("/")
    headers = {}
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            fail(f"--token-env {token_env}: that environment variable is not set", code=2)
        headers[TOKEN_HEADER] = token
    with httpx.Client(headers=headers, timeout=10) as client:
        health = _neuron_get(client, endpoint, "/health")
        discovery = _neuron_get(client, endpoint, "/discovery")
        models = _neuron_get(client, endpoint, "/models")
    if as_json:
        payload = {"health": health, "discovery": discovery, "models": models.get("models", [])}
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    render_neuron(endpoint, health, discovery, models)


__all__ = ["ENDPOINT_ENV", "neuron_status", "status"]
