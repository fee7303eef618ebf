"""The fleet dashboard: one page at ``/ui`` that shows the gateway's fleet view and, for admin
keys, loads, unloads, pins and unpins models (docs/operators.md, "The dashboard").

How it is built, and why:

- **Plain files from the package** (``static/``: HTML, CSS, one small script, an icon): no build
  chain, nothing fetched from elsewhere, so it works offline and a strict
  ``Content-Security-Policy`` (``'self'`` only, no inline script or style) holds.
- **The same keys as the API, no new auth scheme, no cookies.** The page and its files hold no
  data and are served without a key (a browser cannot add a header to a navigation). The data,
  ``GET /ui/api/state``, needs a key like every API route; the key is typed into the page, kept
  in ``sessionStorage`` (gone with the tab) and sent by the script as ``Authorization: Bearer``,
  so a cross-site page has nothing to ride: no cookie, and no CORS answer that would let it read
  or send that header. Actions go to the admin API itself (``POST /admin/models/...``), so they
  get its checks and errors and need an admin key exactly as ``cortex load`` does.
- **Short polling** (every ``poll_interval``, at least 1 s, paused while the tab is hidden):
  ``EventSource`` cannot send an ``Authorization`` header, and a key in a URL ends up in logs.
  The answer is the gateway's own fleet view (:func:`cortex.gateway.status_view.fleet_status`,
  the catalogue), so the dashboard never asks a neuron anything.
- Charts come from :mod:`cortex.gateway.ui.series`, which samples the gateway's metrics every
  few seconds; the request path does no extra work for the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from cortex import __version__
from cortex.auth import GatewayAuth, presented_key
from cortex.gateway.redact import public_details
from cortex.gateway.router import canonical_or_none
from cortex.gateway.service import Gateway
from cortex.gateway.status_view import fleet_status
from cortex.gateway.ui.series import TrafficSeries
from cortex.wire.errors import ApiError

PREFIX = "/ui"
STATE_PATH = f"{PREFIX}/api/state"
MODES = ("off", "read-only", "admin")
# Served without a key: they hold no data (name -> content type).
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Files are small and change only with an upgrade: the browser revalidates each time.
STATIC_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
STATE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


def _read_static() -> dict[str, bytes]:
    folder = resources.files(__name__) / "static"
    return {name: (folder / name).read_bytes() for name in (*STATIC_FILES, "index.html")}


class Dashboard:
    """The ``/ui`` routes of one gateway and the sampler behind its charts."""

    def __init__(self, gateway: Gateway, auth: GatewayAuth, mode: str) -> None:
        if mode not in MODES or mode == "off":
            raise ValueError(f"dashboard mode must be 'read-only' or 'admin', not {mode!r}")
        self.gateway = gateway
        self.auth = auth
        self.mode = mode
        self.series = TrafficSeries(gateway.metrics)
        self.files = _read_static()
        self.open_paths = frozenset(
            {PREFIX, f"{PREFIX}/", *(f"{PREFIX}/static/{name}" for name in STATIC_FILES)}
        )
        self.poll_s = max(1.0, gateway.config.gateway.poll_interval.seconds or 2.0)
        self._sampler: asyncio.Task[None] | None = None

    def is_open(self, path: str) -> bool:
        """A path served without a key (the page and its files, never data)."""
        return path in self.open_paths

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._sampler = asyncio.create_task(self.series.run(), name="dashboard-sampler")

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sampler

    # ---- what the page reads ------------------------------------------------------------------

    def role(self, headers: Any) -> str:
        """``open`` (auth off), ``admin`` or ``client``: the key already passed the middleware."""
        if not self.auth.enabled:
            return "open"
        return "admin" if self.auth.admin_keys.matches(presented_key(headers)) else "client"

    def state(self, headers: Any) -> dict[str, Any]:
        role = self.role(headers)
        health = self.gateway.health()
        status = fleet_status(self.gateway)
        return {
            "dashboard": {
                "mode": self.mode,
                "role": role,
                "can_act": self.mode == "admin" and role in ("open", "admin"),
                "auth": self.auth.enabled,
                "poll_s": self.poll_s,
                "step_s": self.series.step_s,
                "window_s": self.series.window_s,
                "version": __version__,
            },
            "at": time.time(),
            "health": {k: health[k] for k in ("status", "nodes_up", "nodes_total", "models_ready")},
            # an API key (not an admin's) sees what a client may see of errors and nodes: no
            # URLs, paths or addresses (docs/security.md), as every other client answer
            "status": status if role != "client" else public_details(status),
            "catalogue": self.gateway.catalogue(),
            # the models.toml profiles (what a pin applies to), by canonical id
            "profiles": self._profiles(),
            "series": self.series.to_json(),
        }

    def _profiles(self) -> list[dict[str, Any]]:
        source = self.gateway.default_source
        found = []
        for profile in self.gateway.models.models:
            canonical = canonical_or_none(profile.id, source)
            if canonical is not None:
                found.append({"id": canonical, "pinned": profile.pinned})
        return found

    # ---- routes -------------------------------------------------------------------------------

    def install(self, app: FastAPI) -> None:
        files = self.files

        @app.get(PREFIX, include_in_schema=False)
        async def ui_redirect() -> Response:
            # Relative, so the page works behind a proxy that adds a path prefix.
            return RedirectResponse("ui/", status_code=307, headers=SECURITY_HEADERS)

        @app.get(f"{PREFIX}/", include_in_schema=False)
        async def ui_page() -> Response:
            return Response(
                files["index.html"], media_type="text/html; charset=utf-8", headers=STATIC_HEADERS
            )

        @app.get(PREFIX + "/static/{name}", include_in_schema=False)
        async def ui_static(name: str) -> Response:
            content_type = STATIC_FILES.get(name)
            if content_type is None:
                raise ApiError(404, "not_found", f"no dashboard file {name!r}")
            return Response(files[name], media_type=content_type, headers=STATIC_HEADERS)

        @app.get(STATE_PATH, include_in_schema=False)
        async def ui_state(request: Request) -> Response:
            return JSONResponse(self.state(request.headers), headers=STATE_HEADERS)
