"""``/admin/*``: operator routes for loading and unloading models through the gateway.

Why here and not only on the neurons: an operator (or a script warming a fleet before office
hours) should not need the cluster token or know which node to ask; the gateway places a load
exactly as it would for a request (profile, free memory, eviction) and unloads wherever a model
is, and pins or unpins a model for as long as the gateway runs (:mod:`cortex.gateway.pins`).
These routes need an admin key when keys are configured (docs/security.md).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cortex.config import ModelProfile
from cortex.gateway.accounting import GROUPS, parse_time
from cortex.gateway.limits import rfc3339
from cortex.gateway.pins import set_pinned
from cortex.gateway.service import Gateway
from cortex.gateway.status_view import fleet_status
from cortex.wire.errors import ApiError, bad_request, model_not_found
from cortex.wire.http import read_json_object

# Fetch Metadata: a browser says where a request comes from; curl, the SDKs and `cortex load`
# send nothing. An action asked by another site's page (another port of the same host counts as
# "same-site") is refused, so a gateway with auth off (a laptop on loopback) cannot be driven by
# a page its operator happens to visit. The dashboard's own requests are "same-origin".
CROSS_SITE = frozenset({"cross-site", "same-site"})


def _refuse_cross_site(request: Request) -> None:
    if request.headers.get("sec-fetch-site", "").strip().lower() in CROSS_SITE:
        raise ApiError(
            403,
            "cross_site_request",
            "admin actions are refused when another site's page asks for them "
            "(Sec-Fetch-Site); use the gateway's own dashboard, the CLI or curl",
        )


def _model_field(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model id or an alias", param="model")
    return model


def install_admin_routes(app: FastAPI, gateway: Gateway) -> None:
    max_bytes = gateway.config.gateway.max_body_bytes

    @app.get("/admin/models")
    async def admin_models() -> JSONResponse:
        """The fleet view: every node, its models, loads in progress and failed loads."""
        failures = gateway.scheduler.failures
        return JSONResponse(
            {
                **gateway.health(),
                "models": gateway.catalogue(),
                "failed_loads": {k: f.to_json(public=False) for k, f in failures.items()},
            }
        )

    @app.get("/admin/status")
    async def admin_status() -> JSONResponse:
        """Nodes with devices and memory, models with state, in-flight, idle time and pinning,
        loads in progress, failed loads and recent events (``cortex status``)."""
        return JSONResponse(fleet_status(gateway))

    @app.get("/admin/usage")
    async def admin_usage(
        key: str | None = None,
        since: str = "30d",
        until: str | None = None,
        group: str = "total",
    ) -> JSONResponse:
        """Usage per key and model from the usage store (every gateway that shares it):
        requests, errors, prompt and completion tokens, seconds (``cortex usage``)."""
        accounting = gateway.accounting
        if accounting is None:
            raise ApiError(
                409,
                "usage_off",
                "this gateway accounts usage per key, and has no keys (auth is off)",
            )
        if group not in GROUPS:
            raise bad_request(
                f"group must be one of {', '.join(GROUPS)}", param="group", code="invalid_group"
            )
        now = time.time()
        start = parse_time(since, now, "since")
        # without ``until``: everything so far (the current hour's bucket included), said as now
        end = parse_time(until, now, "until") if until is not None else now + 3600
        shown_until = end if until is not None else now
        rows = await accounting.query(start, end, key, group)
        return JSONResponse(
            {
                "since": rfc3339(start // 3600 * 3600),
                "until": rfc3339(shown_until),
                "group": group,
                "key": key,
                "store": accounting.status()["store"],
                "usage": rows,
            }
        )

    @app.get("/admin/events")
    async def admin_events(limit: int = 50) -> JSONResponse:
        """The gateway's recent loads and evictions, newest first (``cortex status``)."""
        events = gateway.scheduler.events.latest(min(max(limit, 0), 200))
        return JSONResponse({"events": events})

    @app.post("/admin/models/load")
    async def admin_load(request: Request) -> JSONResponse:
        """Load a model where a request for it would (a no-op when it is ready somewhere), or
        on ``node`` when given (a no-op when it is ready there)."""
        _refuse_cross_site(request)
        body = await read_json_object(request, max_bytes)
        model = _model_field(body)
        only = body.get("node")
        if only is not None and not isinstance(only, str):
            raise bad_request("'node' must be a node name", param="node")
        if only is not None and only not in {n.name for n in gateway.nodes()}:
            known_nodes = ", ".join(sorted(n.name for n in gateway.nodes()))
            raise ApiError(
                404,
                "node_not_found",
                f"no node named {only!r} (known: {known_nodes})",
                param="node",
            )
        resolved = gateway.resolve(model)
        known, _only_down = gateway.scheduler.known(resolved)
        if not known:
            raise model_not_found(model, "not loaded anywhere and not in models.toml")
        ready = [
            n.name
            for n in gateway.nodes()
            if n.up
            and only in (None, n.name)
            and (m := n.model(resolved.canonical)) is not None
            and m.state == "ready"
        ]
        if ready:
            return JSONResponse({"model": resolved.canonical, "nodes": ready, "loaded": False})
        if only is not None:
            # The profile as configured, placed on that node only.
            profile = resolved.profile or ModelProfile(id=resolved.canonical)
            resolved = attrs.evolve(resolved, profile=attrs.evolve(profile, nodes=[only]))
        node = await gateway.scheduler.ensure_loaded(resolved)
        return JSONResponse({"model": resolved.canonical, "nodes": [node], "loaded": True})

    @app.post("/admin/models/unload")
    async def admin_unload(request: Request) -> JSONResponse:
        """Unload a model from every node (or only ``node``) where it is loaded."""
        _refuse_cross_site(request)
        body = await read_json_object(request, max_bytes)
        resolved = gateway.resolve(_model_field(body))
        only = body.get("node")
        if only is not None and not isinstance(only, str):
            raise bad_request("'node' must be a node name", param="node")
        targets = [
            n
            for n in gateway.nodes()
            if n.up and n.model(resolved.canonical) is not None and only in (None, n.name)
        ]
        if not targets:
            raise ApiError(
                404,
                "model_not_loaded",
                f"{resolved.canonical} is not loaded on "
                f"{'node ' + repr(only) if only else 'any node that is up'}",
                param="model",
            )
        for node in targets:
            await gateway.scheduler.unload(node.name, resolved.canonical, reason="admin")
        return JSONResponse(
            {"model": resolved.canonical, "unloaded_from": [n.name for n in targets]}
        )

    async def pin(request: Request, pinned: bool) -> JSONResponse:
        _refuse_cross_site(request)
        body = await read_json_object(request, max_bytes)
        resolved = gateway.resolve(_model_field(body))
        was = bool(resolved.profile is not None and resolved.profile.pinned)
        profile = set_pinned(gateway, resolved, pinned)
        return JSONResponse(
            {"model": resolved.canonical, "pinned": profile.pinned, "changed": was != pinned}
        )

    @app.post("/admin/models/pin")
    async def admin_pin(request: Request) -> JSONResponse:
        """Pin a model of models.toml until the gateway restarts: never evicted, never
        unloaded by keep_alive."""
        return await pin(request, True)

    @app.post("/admin/models/unpin")
    async def admin_unpin(request: Request) -> JSONResponse:
        """Unpin a model of models.toml until the gateway restarts."""
        return await pin(request, False)
