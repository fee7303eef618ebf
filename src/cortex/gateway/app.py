"""The gateway's ASGI application: the generation routes as plain ASGI endpoints
(:mod:`cortex.gateway.fast_path`, from the table in :mod:`cortex.gateway.routes`), and FastAPI
for everything else: ``/v1/models``, ``/health``, ``/admin/*`` and, when ``[gateway] dashboard``
is on, the dashboard at ``/ui``.

Handlers read raw JSON (no pydantic on the hot path) and every failure leaves as an
:class:`ApiError` in the route's envelope, with ``Retry-After`` when retrying can work.

Where to add a router (a dashboard, another admin surface): :func:`install_extra_routes` is the
mount point -- it runs after the built-in FastAPI routes and before the OpenAPI bodies are
documented, so a router included there gets the same key check (``AuthMiddleware``: ``/admin/*``
needs an admin key), body limit and error envelopes as ``/admin/*``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cortex import __version__
from cortex.auth import AuthMiddleware, GatewayAuth
from cortex.gateway.admin import install_admin_routes
from cortex.gateway.fast_path import PlainEndpoint
from cortex.gateway.routes import GENERATION_ROUTES, openapi_paths
from cortex.gateway.service import Gateway
from cortex.gateway.status_view import public_health
from cortex.gateway.ui import Dashboard
from cortex.request_schemas import document_request_bodies
from cortex.wire.errors import ApiError
from cortex.wire.http import install_error_handlers
from cortex.wire.limits import BodyLimitMiddleware

MAX_BODY_BYTES = 32 * 2**20
# FastAPI >= 0.165 checks for OpenTelemetry providers on every request (an os.environ read
# among others: 3% of the gateway's CPU under load, docs/benchmarks.md). cortex reports
# through its own Prometheus metrics and request logs, so FastAPI's native telemetry is off.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


class RecordedAuth:
    """The gateway's key check with every refusal counted and written to the request log
    (a client with a wrong key shows up there, not only in its own error message). Wraps the
    :class:`GatewayAuth` the middleware asks. ``is_open`` names the paths served without a
    key: the dashboard's page and files, which hold no data."""

    def __init__(
        self,
        auth: GatewayAuth,
        gateway: Gateway,
        is_open: Callable[[str], bool] | None = None,
    ) -> None:
        self._auth = auth
        self._gateway = gateway
        self._is_open = is_open

    def check(self, path: str, headers: Mapping[str, str]) -> ApiError | None:
        if self._is_open is not None and self._is_open(path):
            return None
        error = self._auth.check(path, headers)
        if error is not None:
            self._gateway.recorder.open(path).fail(error)
        return error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._auth, name)


class GatewayApp(FastAPI):
    """FastAPI with a plain-ASGI short cut: a request to a path in :attr:`fast_routes` (under
    the app's ``root_path`` too) goes straight to its endpoint, whatever the method (the
    endpoint answers 405 to anything but ``POST``); everything else goes through FastAPI."""

    fast_routes: dict[str, PlainEndpoint]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            endpoint = self.fast_routes.get(_route_path(scope))
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document plus the generation routes, which have no FastAPI route."""
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("paths", {}).update(openapi_paths())
            self.openapi_schema = schema
        return self.openapi_schema


def _route_path(scope: Any) -> str:
    """The path without the app's ``root_path`` (as Starlette's router matches it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def install_extra_routes(app: FastAPI, gateway: Gateway, dashboard: Dashboard | None) -> None:
    """The mount point for routers beyond the API (see the module docstring): the dashboard's
    ``/ui`` when it is on."""
    if dashboard is not None:
        dashboard.install(app)


def create_app(gateway: Gateway, auth: GatewayAuth | None = None) -> GatewayApp:
    """The gateway's app; its lifespan starts and stops ``gateway`` (pollers, session, tasks).
    ``auth`` defaults to the keys named in ``[auth]`` (docs/security.md)."""
    if auth is None:
        auth = GatewayAuth.from_config(gateway.config.auth, gateway.config.base_dir)
    gateway.install_keys(auth)  # names, limits and usage accounting (auth on only)
    mode = gateway.config.gateway.dashboard
    dashboard = Dashboard(gateway, auth, mode) if mode != "off" else None
    recorded = cast(
        GatewayAuth, RecordedAuth(auth, gateway, dashboard.is_open if dashboard else None)
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        if dashboard is not None:
            dashboard.start()
        try:
            yield
        finally:
            if dashboard is not None:
                await dashboard.stop()
            await gateway.stop()

    app = GatewayApp(
        title="cortex gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **_NO_NATIVE_TELEMETRY,
    )
    app.state.gateway = gateway
    app.state.dashboard = dashboard
    install_error_handlers(app)
    # Outermost last: keys are checked before a byte of the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=gateway.config.gateway.max_body_bytes)
    app.add_middleware(AuthMiddleware, auth=recorded)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": gateway.catalogue()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        # Any name a generation route accepts: an alias, a bare org/name, a scheme:org/name.
        names = [model_id]
        with contextlib.suppress(ApiError):
            names.append(gateway.resolve(model_id).canonical)
        entries = gateway.catalogue()
        for name in names:
            for entry in entries:
                if entry["id"] == name:
                    return JSONResponse(entry)
        raise ApiError(404, "model_not_found", f"model {model_id!r} not found", param="model")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(public_health(gateway))  # the node list: /admin/status

    # The generation routes: plain ASGI, ahead of FastAPI (the key check is the unrecorded one:
    # the endpoint records a refusal on the request's tally).
    max_bytes = gateway.config.gateway.max_body_bytes
    app.fast_routes = {
        route.path: PlainEndpoint(route, gateway.dispatcher, gateway.recorder, auth, max_bytes)
        for route in GENERATION_ROUTES
    }
    install_admin_routes(app, gateway)
    install_extra_routes(app, gateway, dashboard)
    document_request_bodies(app)
    return app
