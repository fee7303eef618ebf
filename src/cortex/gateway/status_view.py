"""``GET /admin/status``: everything ``cortex status`` shows, in one answer.

Why one route: an operator's terminal should not need five round trips (and five chances to see
a fleet change half way) to draw one picture. The view joins what the poller knows (devices,
models and their state on each node) with what only the gateway knows (requests in flight now,
last use, pinned profiles, loads in progress, failed loads, recent loads and evictions).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cortex.gateway.router import find_profile

if TYPE_CHECKING:
    from cortex.gateway.nodes import NodeModel, NodeState
    from cortex.gateway.service import Gateway

RECENT_EVENTS = 20


def _model_view(gateway: Gateway, node: NodeState, model: NodeModel, now: float) -> dict[str, Any]:
    key = (node.name, model.id)
    profile = find_profile(gateway.models, model.id, gateway.default_source)
    last = max(model.last_used, model.loaded_at, gateway.usage.last_used.get(key, 0.0))
    return {
        "id": model.id,
        "node": node.name,
        "device": model.device,
        "devices": list(model.spans),
        "harness": model.harness,
        "state": model.state,
        "memory_bytes": model.memory_bytes,
        "in_flight": max(model.in_flight, gateway.usage.busy(node.name, model.id)),
        "idle_s": round(max(0.0, now - last), 1) if last else None,
        "pinned": bool(profile is not None and profile.pinned),
        "error": model.error,
    }


def _node_view(node: NodeState) -> dict[str, Any]:
    devices = node.discovery.devices if node.discovery is not None else ()
    return {
        "name": node.name,
        "endpoint": node.endpoint,
        "up": node.up,
        "last_error": node.health.last_error,
        "devices": [
            {
                "key": d.key,
                "kind": d.kind,
                "state": d.state,
                "reserved_by": d.reserved_by,
                "total_bytes": d.total_memory,
                "used_bytes": max(0, d.total_memory - d.free_memory),
            }
            for d in devices
        ],
    }


PUBLIC_HEALTH_FIELDS = ("status", "nodes_up", "nodes_total", "models_ready")


def public_health(gateway: Gateway) -> dict[str, Any]:
    """``GET /health`` (no key needed): whether the fleet serves, in counts.

    Why not the node list: the route is open to anyone who can reach the port (load balancers
    and probes need no key), and each node's endpoint and last connection error are a map of the
    private network. Operators get them, with an admin key, from ``/admin/status`` (and
    ``cortex status``) and ``/admin/models`` (docs/security.md).
    """
    full = gateway.health()
    return {key: full[key] for key in PUBLIC_HEALTH_FIELDS}


def fleet_status(gateway: Gateway) -> dict[str, Any]:
    now = time.time()
    nodes = gateway.nodes()
    loader = gateway.loader
    return {
        "status": gateway.health()["status"],
        "nodes": [_node_view(n) for n in nodes],
        "models": [_model_view(gateway, n, m, now) for n in nodes if n.up for m in n.models],
        "loads_in_progress": sorted(loader.loads) if loader is not None else [],
        "failed_loads": (
            {k: f.to_json(public=False) for k, f in loader.failures.items()}
            if loader is not None
            else {}
        ),
        "events": loader.events.latest(RECENT_EVENTS) if loader is not None else [],
    }
