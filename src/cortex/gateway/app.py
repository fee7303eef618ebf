"""The gateway's FastAPI application: ``/v1/models``, the generation routes (OpenAI chat and
completions, Anthropic messages, OpenAI responses), ``/health``, ``/admin/*`` and, when
``[gateway] dashboard`` is on, the dashboard at ``/ui``.

Handlers read raw JSON (no pydantic on the hot path) and every failure leaves as an
:class:`ApiError` in the OpenAI envelope, with ``Retry-After`` when retrying can work.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cortex import __version__
from cortex.auth import AuthMiddleware, GatewayAuth
from cortex.gateway.admin import install_admin_routes
from cortex.gateway.admission import ClientWatch
from cortex.gateway.dialects import DIALECT_ANSWERS, install_dialect_routes
from cortex.gateway.fast_path import PlainEndpoint
from cortex.gateway.service import Gateway
from cortex.gateway.status_view import public_health
from cortex.gateway.ui import Dashboard
from cortex.request_schemas import document_request_bodies
from cortex.wire.errors import ApiError
from cortex.wire.http import default_dialect, install_error_handlers, read_json_object
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
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


class RecordedAuth:
    """The gateway's key check with every refusal counted and written to the request log
    (a client with a wrong key shows up there, not only in its own error message). Wraps the
    :class:`GatewayAuth` both the middleware and the plain-ASGI routes ask. ``is_open`` names
    the paths served without a key: the dashboard's page and files, which hold no data."""

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
            self._gateway.record_failure(path, None, error)
        return error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._auth, name)


class GatewayApp(FastAPI):
    """FastAPI with a plain-ASGI short cut: ``POST`` to a path in :attr:`fast_routes` goes
    straight to its callable (:mod:`cortex.gateway.fast_path`), everything else through FastAPI."""

    fast_routes: dict[str, Any]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast_routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(gateway: Gateway, auth: GatewayAuth | None = None) -> GatewayApp:
    """A FastAPI app whose lifespan starts and stops ``gateway`` (poller, sessions, tasks).
    ``auth`` defaults to the keys named in ``[auth]`` (docs/security.md)."""
    if auth is None:
        auth = GatewayAuth.from_config(gateway.config.auth, gateway.config.base_dir)
    mode = gateway.config.gateway.dashboard
    dashboard = Dashboard(gateway, auth, mode) if mode != "off" else None
    auth = cast(GatewayAuth, RecordedAuth(auth, gateway, dashboard.is_open if dashboard else None))

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
    app.add_middleware(AuthMiddleware, auth=auth)
    app.add_middleware(ClientWatch)  # queued waiters see their client leave

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": gateway.catalogue()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        # Any name a generation route accepts: an alias, a bare org/name, a scheme:org/name.
        names = [model_id]
        with contextlib.suppress(ApiError):
            names.append(gateway.resolve(model_id, gateway.default_source).canonical)
        entries = gateway.catalogue()
        for name in names:
            for entry in entries:
                if entry["id"] == name:
                    return JSONResponse(entry)
        raise ApiError(404, "model_not_found", f"model {model_id!r} not found", param="model")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(public_health(gateway))  # the node list: /admin/status

    async def generation(request: Request) -> Response:
        route = request.url.path
        payload: dict[str, Any] | None = None
        try:
            payload = await read_json_object(request, gateway.config.gateway.max_body_bytes)
            return await gateway.generate(route, payload, request.headers)
        except ApiError as exc:
            gateway.record_failure(route, payload.get("model") if payload else None, exc)
            raise

    for path in GENERATION_ROUTES:
        app.add_api_route(path, generation, methods=["POST"])
    generation_endpoint = PlainEndpoint(gateway, auth, gateway.generate)
    app.fast_routes = dict.fromkeys(GENERATION_ROUTES, generation_endpoint)
    for path, answer in DIALECT_ANSWERS.items():
        app.fast_routes[path] = PlainEndpoint(
            gateway, auth, functools.partial(answer, gateway), default_dialect(path)
        )

    install_dialect_routes(app, gateway)
    install_admin_routes(app, gateway)
    if dashboard is not None:
        dashboard.install(app)
    document_request_bodies(app)
    return app
