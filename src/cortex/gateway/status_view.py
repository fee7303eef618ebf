"""``GET /admin/status``: everything ``cortex status`` shows, in one answer.

Why one route: an operator's terminal should not need five round trips (and five chances to see
a fleet change half way) to draw one picture. The view joins what the poller knows (devices,
models and their state on each node) with what only the gateway knows (requests in flight now,
last use, pinned profiles, loads in progress, failed loads, recent loads and evictions, recent
request errors). The dashboard (:mod:`cortex.gateway.ui`) draws the same answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cortex.gateway.nodes import READY
from cortex.gateway.router import find_profile

if TYPE_CHECKING:
    from cortex.gateway.nodes import NodeModel, NodeState
    from cortex.gateway.service import Gateway

RECENT_EVENTS = 20
RECENT_ERRORS = 20


def _model_view(gateway: Gateway, node: NodeState, model: NodeModel, now: float) -> dict[str, Any]:
    key = (node.name, model.id)
    profile = find_profile(gateway.models, model.id, gateway.default_source)
    usage = gateway.scheduler.usage
    last = max(model.last_used, model.loaded_at, usage.last_used.get(key, 0.0))
    in_flight = max(model.in_flight, usage.busy(node.name, model.id))
    pinned = bool(profile is not None and profile.pinned)
    keep_alive = profile.keep_alive.seconds if profile is not None else None
    idle = round(max(0.0, now - last), 1) if last else None
    # seconds until keep_alive unloads it if it stays idle (None: it never does; keep_alive
    # only unloads ready models)
    left = None
    if keep_alive is not None and not pinned and model.state == READY:
        left = keep_alive if in_flight or idle is None else round(max(0.0, keep_alive - idle), 1)
    return {
        "id": model.id,
        "node": node.name,
        "device": model.device,
        "devices": list(model.spans),
        "harness": model.harness,
        "state": model.state,
        "memory_bytes": model.memory_bytes,
        "context_length": model.context_length,
        "capabilities": sorted(model.capabilities),
        "in_flight": in_flight,
        "running": model.running,
        "waiting": model.waiting,
        "max_batch": model.max_batch,
        "idle_s": idle,
        "pinned": pinned,
        "keep_alive_s": keep_alive,
        "keep_alive_left_s": left,
        "error": model.error,
    }


def _node_view(gateway: Gateway, node: NodeState) -> dict[str, Any]:
    devices = node.discovery.devices if node.discovery is not None else ()
    return {
        "name": node.name,
        "endpoint": node.endpoint,
        "up": node.up,
        "last_error": node.health.last_error,
        "in_flight": gateway.scheduler.usage.node_busy(node.name),
        "devices": [
            {
                "key": d.key,
                "kind": d.kind,
                "state": d.state,
                "reserved_by": d.reserved_by,
                "total_bytes": d.total_memory,
                "used_bytes": max(0, d.total_memory - d.free_memory),
                "queue_depth": d.queue_depth,
                "requests_in_progress": d.requests_in_progress,
                "max_queue": d.max_queue,
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
    scheduler = gateway.scheduler
    return {
        "status": gateway.health()["status"],
        "nodes": [_node_view(gateway, n) for n in nodes],
        "models": [_model_view(gateway, n, m, now) for n in nodes if n.up for m in n.models],
        "loads_in_progress": scheduler.loads_in_progress(),
        "failed_loads": {k: f.to_json(public=False) for k, f in scheduler.failures.items()},
        "events": scheduler.events.latest(RECENT_EVENTS),
        "errors": gateway.recent_errors.latest(RECENT_ERRORS),
        "keys": key_views(gateway),
        "usage_store": gateway.accounting.status() if gateway.accounting is not None else None,
    }


def key_views(gateway: Gateway) -> list[dict[str, Any]]:
    """Each key name (never a key): its limits, what is left of them now, and its requests
    in flight through this gateway (``cortex status``). Empty with auth off."""
    limits = gateway.limits
    if limits is None:
        return []
    now, wall = limits.clock(), limits.wall()
    gates = gateway.scheduler.admission.gates.values()
    views = []
    for name, state in sorted(limits.states.items()):
        view = state.to_json(now, wall)
        view["in_flight"] = sum(gate.held.get(name, 0) for gate in gates)
        views.append(view)
    return views
