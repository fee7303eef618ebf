"""The gateway at run time: fleet, loader, usage, metrics and the request path between them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from starlette.responses import Response

from cortex.auth import NEURON_TOKEN_HEADER, read_token, without_credentials
from cortex.config import CortexConfig, ModelsConfig
from cortex.eviction import EvictionStrategy
from cortex.gateway.admission import Admission, Slot
from cortex.gateway.catalogue import build_catalogue
from cortex.gateway.dialects import TranslatorFactory, WholeTranslator, relay_translated
from cortex.gateway.fleet import Fleet
from cortex.gateway.loader import Loader
from cortex.gateway.metrics import (
    NO_NODE,
    OTHER,
    GatewayMetrics,
    RequestSeries,
    code_label,
    route_label,
)
from cortex.gateway.neuron_client import post_json
from cortex.gateway.nodes import NodeState
from cortex.gateway.proxy import ModelRewriter, StreamObserver, UpstreamUnreachable, forward
from cortex.gateway.recent_errors import RecentErrors
from cortex.gateway.redact import public
from cortex.gateway.router import Resolved, Resolver, least_busy, replicas
from cortex.gateway.usage import Usage
from cortex.logging import request_logger
from cortex.wire.errors import ApiError, model_not_found
from cortex.wire.keepalive import GATEWAY_UPSTREAM_KEEPALIVE_S
from cortex.wire.tls import client_context

log = logging.getLogger(__name__)
request_log = request_logger()

NODE_HEADER = "x-cortex-node"
MODEL_HEADER = "x-cortex-model"
MAX_ROUTING_ATTEMPTS = 3
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"


def load_strategy(name: str) -> EvictionStrategy:
    """The eviction strategy named in ``[eviction] strategy`` (a plugin), or a clear error."""
    from cortex.plugins import get_registry

    strategies = get_registry().eviction_strategies()
    if name not in strategies:
        known = ", ".join(sorted(strategies))
        raise ValueError(f"[eviction] strategy {name!r} is not registered (known: {known})")
    return strategies[name]


class Gateway:
    def __init__(
        self,
        config: CortexConfig,
        models: ModelsConfig,
        strategy: EvictionStrategy,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.models = models
        self.resolve = Resolver(models)
        self.strategy = strategy
        self.metrics = metrics or GatewayMetrics()
        self.usage = Usage()
        self.recent_errors = RecentErrors()  # /admin/status and the dashboard
        self.session: aiohttp.ClientSession | None = None
        self.fleet: Fleet | None = None
        self.loader: Loader | None = None
        self._maintenance: asyncio.Task[None] | None = None
        g = config.gateway
        # The shared token every call to a neuron carries (None: neurons run without one).
        self.neuron_token = read_token(
            config.auth.neuron_token_env, os.environ, "[auth] neuron_token_env"
        )
        self.retry_after = float(g.retry_after)
        self.admission = Admission(
            g.max_in_flight_per_model,
            g.model_queue_size,
            g.queue_timeout.seconds,
            self.retry_after,
        )
        self.node_limit = g.max_in_flight_per_node
        self.proxy_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=g.connect_timeout.seconds,
            sock_connect=g.connect_timeout.seconds,
            sock_read=g.idle_timeout.seconds,
        )

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
            keepalive_timeout=GATEWAY_UPSTREAM_KEEPALIVE_S,  # below the neuron's: it lets go first
            ssl=client_context(self.config.neuron_tls, self.config.base_dir) or True,
        )
        headers = {NEURON_TOKEN_HEADER: self.neuron_token} if self.neuron_token else None
        # Neurons set no cookies: a dummy jar skips cookie filtering on every request/answer.
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        g = self.config.gateway
        self.fleet = Fleet(
            self.config.neurons,
            self.session,
            poll_interval=g.poll_interval.seconds or 2.0,
            down_after=g.down_after_failures,
            request_timeout=g.connect_timeout.seconds or 5.0,
            on_health_change=self._health_changed,
        )
        for name in self.fleet.nodes:
            self.metrics.node_up.labels(name).set(0)
        self.loader = Loader(
            self.config,
            self.models,
            self.fleet,
            self.usage,
            self.strategy,
            self.session,
            self.metrics,
            self.default_source,
        )
        await self.fleet.poll_all()
        self.loader.default_source = self.default_source
        self.fleet.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="gateway-maintenance")

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._maintenance
        if self.fleet is not None:
            await self.fleet.stop()
        if self.loader is not None:
            for task in list(self.loader.loads.values()):
                task.cancel()
        if self.session is not None:
            await self.session.close()

    def _health_changed(self, node: NodeState) -> None:
        self.metrics.node_up.labels(node.name).set(1 if node.up else 0)

    async def _maintain(self) -> None:
        interval = min(self.config.gateway.poll_interval.seconds or 2.0, 1.0)
        while True:
            await asyncio.sleep(interval)
            assert self.loader is not None
            try:
                await self.loader.unload_idle()
                await self.loader.defrag_idle_nodes()
            except Exception:
                log.exception("maintenance failed")

    # ---- views ------------------------------------------------------------------------------

    @property
    def default_source(self) -> str:
        assert self.fleet is not None
        return self.fleet.default_source(self.config.gateway.default_source)

    def nodes(self) -> list[NodeState]:
        assert self.fleet is not None
        return list(self.fleet.nodes.values())

    def catalogue(self) -> list[dict[str, Any]]:
        entries = build_catalogue(self.nodes(), self.models, self.usage, self.default_source)
        failures = self.loader.failures if self.loader is not None else {}
        for entry in entries:
            failure = failures.get(entry["id"])
            if failure is not None and entry["state"] not in ("ready", "loading"):
                entry["state"] = "failed"  # the gateway's last load failed: say why
                entry["error"] = failure.to_json()
        return entries

    def health(self) -> dict[str, Any]:
        nodes = []
        for node in self.nodes():
            nodes.append(
                {
                    "name": node.name,
                    "endpoint": node.endpoint,
                    "up": node.up,
                    "consecutive_failures": node.health.failures,
                    "last_error": node.health.last_error,
                    "models_ready": sum(1 for m in node.models if m.state == "ready")
                    if node.up
                    else 0,
                    "in_flight": self.usage.node_busy(node.name),
                }
            )
        up = sum(1 for n in nodes if n["up"])
        status = "ok" if up == len(nodes) and nodes else ("degraded" if up else "unavailable")
        return {
            "status": status,
            "nodes_up": up,
            "nodes_total": len(nodes),
            "models_ready": len(
                {m.id for n in self.nodes() if n.up for m in n.models if m.state == "ready"}
            ),
            "loads_in_progress": sorted(self.loader.loads) if self.loader else [],
            "nodes": nodes,
        }

    def model_label(self, requested: object) -> str:
        """The canonical id of a model the gateway knows (models.toml, an alias, loaded on a
        neuron), else ``other``: a metrics label no client can multiply."""
        if not isinstance(requested, str) or not requested:
            return OTHER
        try:
            resolved = self.resolve(requested, self.default_source)
        except ApiError:
            return OTHER
        return resolved.canonical if self._known(resolved)[0] else OTHER

    def record_failure(self, route: str, requested: object, error: ApiError) -> None:
        """Count and log a request that failed before a neuron answered it."""
        if getattr(error, "recorded", False):
            return
        path = route[:200]  # the log line names the path asked for; metrics a bounded label
        route, model = route_label(route), self.model_label(requested)
        self.metrics.requests.labels(route, model, NO_NODE, "error").inc()
        self.metrics.errors.labels(route, code_label(error.code)).inc()
        shown = requested[:200] if isinstance(requested, str) else None
        self.recent_errors.add(path, shown, NO_NODE, error.code, error.status, error.message)
        request_log.info(
            path,
            extra={
                "fields": {
                    "model": shown,
                    "node": NO_NODE,
                    "status": "error",
                    "http_status": error.status,
                    "code": error.code,
                }
            },
        )

    # ---- routing ----------------------------------------------------------------------------

    def _known(self, resolved: Resolved) -> tuple[bool, bool]:
        """(known at all, known only on neurons that are down)."""
        on_up = on_down = False
        for node in self.nodes():
            if node.model(resolved.canonical) is not None:
                if node.up:
                    on_up = True
                else:
                    on_down = True
        return resolved.profile is not None or on_up or on_down, on_down and not on_up

    async def route(
        self,
        resolved: Resolved,
        exclude: set[str] = frozenset(),
        load_waits: list[float] | None = None,
    ) -> NodeState:
        """A node with the model ready, loading it first when needed. Counts the request as in
        flight there before returning (no await in between, so eviction cannot race it).
        Time spent waiting for a cold load is appended to ``load_waits``."""
        assert self.loader is not None
        for _attempt in range(MAX_ROUTING_ATTEMPTS):
            ready = [
                nm
                for nm in replicas(self.nodes(), resolved.canonical, self.usage)
                if nm[0].name not in exclude
            ]
            if ready and all(self.usage.node_busy(nm[0].name) >= self.node_limit for nm in ready):
                raise ApiError(
                    503,
                    "nodes_at_capacity",
                    f"every neuron serving {resolved.requested!r} is at its limit of "
                    f"{self.node_limit} requests in flight; retry after a moment",
                    retry_after=self.retry_after,
                )
            ready = [nm for nm in ready if self.usage.node_busy(nm[0].name) < self.node_limit]
            pick = least_busy(ready, resolved.canonical, self.usage)
            if pick is not None:
                self.usage.begin(pick[0].name, resolved.canonical)
                return pick[0]
            known, only_down = self._known(resolved)
            if not known:
                raise model_not_found(resolved.requested)
            if only_down and resolved.profile is None:
                raise ApiError(
                    503,
                    "service_unavailable",
                    f"model {resolved.requested!r} was served only by neurons that are down",
                    retry_after=self.retry_after,
                )
            waited = time.monotonic()
            try:
                await self.loader.ensure_loaded(resolved)
            finally:
                if load_waits is not None:
                    load_waits.append(time.monotonic() - waited)
        raise ApiError(
            503,
            "service_unavailable",
            f"model {resolved.requested!r} was loaded but went away before it could be used",
            retry_after=self.retry_after,
        )

    # ---- the request path -------------------------------------------------------------------

    async def generate(
        self, route: str, payload: dict[str, Any], client_headers: Mapping[str, str]
    ) -> Response:
        """Proxy one ``/v1/chat/completions`` or ``/v1/completions`` request."""
        started = time.monotonic()
        requested = payload.get("model")
        if not isinstance(requested, str) or not requested:
            raise ApiError(
                400,
                "missing_model_field",
                "the request needs a 'model' field naming a model from GET /v1/models",
                param="model",
            )
        resolved = self.resolve(requested, self.default_source)
        upstream = {**payload, "model": resolved.canonical}
        # Token metrics need the usage a stream reports only when asked: ask on behalf of a
        # client that did not, and keep that usage-only chunk from it.
        options = payload.get("stream_options")
        drop_usage_only = (
            payload.get("stream") is True
            and (options is None or isinstance(options, dict))
            and not (options or {}).get("include_usage")
        )
        if drop_usage_only:
            upstream["stream_options"] = {**(options or {}), "include_usage": True}
        body = json.dumps(upstream).encode()
        rewrite = ModelRewriter(resolved.canonical, requested)
        # A client's key is for the gateway alone; the neuron gets the cluster token instead.
        client_headers = without_credentials(client_headers)

        async def relay(node: NodeState, observer: StreamObserver) -> Response:
            return await forward(
                self.session,  # type: ignore[arg-type]
                f"{node.endpoint}{route}",
                body,
                client_headers,
                self.proxy_timeout,
                rewrite,
                observer,
                {NODE_HEADER: node.name, MODEL_HEADER: resolved.canonical},
                self.retry_after,
                drop_usage_only,
            )

        return await self._dispatch(route, resolved, started, relay)

    async def translated(
        self,
        route: str,
        requested: str,
        chat: dict[str, Any],
        client_headers: Mapping[str, str],
        whole: WholeTranslator,
        stream: TranslatorFactory | None,
    ) -> Response:
        """Serve a request another dialect translated into ``chat`` (an OpenAI chat body);
        ``whole`` / ``stream`` translate the answer back."""
        started = time.monotonic()
        resolved = self.resolve(requested, self.default_source)
        body = json.dumps({**chat, "model": resolved.canonical}).encode()
        client_headers = without_credentials(client_headers)

        async def relay(node: NodeState, observer: StreamObserver) -> Response:
            return await relay_translated(
                self.session,  # type: ignore[arg-type]
                f"{node.endpoint}/v1/chat/completions",
                body,
                client_headers,
                self.proxy_timeout,
                observer,
                {NODE_HEADER: node.name, MODEL_HEADER: resolved.canonical},
                self.retry_after,
                whole,
                stream,
                self.config.gateway.stream_keepalive.seconds or 10.0,
            )

        return await self._dispatch(route, resolved, started, relay)

    async def tokenize(self, requested: str, tokenize_body: dict[str, Any]) -> dict[str, Any]:
        """The neuron's ``POST /tokenize`` answer for a model (loaded first when cold)."""
        started = time.monotonic()
        resolved = self.resolve(requested, self.default_source)
        node = await self.route(resolved)
        status = "error"
        try:
            answer = await post_json(
                self.session,  # type: ignore[arg-type]
                f"{node.endpoint}/tokenize",
                {**tokenize_body, "model": resolved.canonical},
                aiohttp.ClientTimeout(
                    total=self.config.gateway.idle_timeout.seconds,
                    sock_connect=self.config.gateway.connect_timeout.seconds,
                ),
                retry_after=self.retry_after,
            )
            status = "ok"
            return answer
        except ApiError as exc:
            self.metrics.errors.labels(COUNT_TOKENS_ROUTE, code_label(exc.code)).inc()
            self.recent_errors.add(
                COUNT_TOKENS_ROUTE, resolved.canonical, node.name, exc.code, exc.status, exc.message
            )
            exc.recorded = True  # type: ignore[attr-defined]  # counted here, with its node
            raise public(exc) from None  # no paths or addresses to clients (docs/security.md)
        finally:
            self.usage.end(node.name, resolved.canonical)
            labels = (COUNT_TOKENS_ROUTE, resolved.canonical, node.name)
            self.metrics.requests.labels(*labels, status).inc()
            self.metrics.duration.labels(*labels).observe(time.monotonic() - started)

    async def _dispatch(
        self,
        route: str,
        resolved: Resolved,
        started: float,
        relay: Callable[[NodeState, StreamObserver], Awaitable[Response]],
    ) -> Response:
        """Admit (bounded per model), route, relay, and on a neuron that cannot be connected
        to, try another replica. The admission slot is held until the answer ends."""
        queued = time.monotonic()
        slot = await self.admission.enter(resolved.canonical)
        queue_wait = time.monotonic() - queued
        known = self._known(resolved)[0]  # an unknown model fails in route(): label it other
        self.metrics.queue_wait.labels(resolved.canonical if known else OTHER).observe(queue_wait)
        try:
            return await self._dispatch_admitted(route, resolved, started, relay, slot, queue_wait)
        except BaseException:
            slot.release()
            raise

    async def _dispatch_admitted(
        self,
        route: str,
        resolved: Resolved,
        started: float,
        relay: Callable[[NodeState, StreamObserver], Awaitable[Response]],
        slot: Slot,
        queue_wait: float,
    ) -> Response:
        tried: set[str] = set()
        load_waits: list[float] = []
        while True:
            node = await self.route(resolved, exclude=tried, load_waits=load_waits)
            series = self.metrics.series(route, resolved.canonical, node.name)
            series.in_flight.inc()
            observer = self._observer(route, node.name, resolved.canonical, started, slot.release)
            self.metrics.overhead.labels(route).observe(
                max(0.0, time.monotonic() - started - queue_wait - sum(load_waits))
            )
            try:
                return await relay(node, observer)
            except ApiError as exc:
                # Already counted and logged when the observer heard the end of the answer.
                exc.recorded = observer.ended  # type: ignore[attr-defined]
                if not isinstance(exc, UpstreamUnreachable):
                    raise
                self._finish(node.name, resolved.canonical, series)
                assert self.fleet is not None
                asyncio.get_running_loop().create_task(self.fleet.refresh(node.name))
                tried.add(node.name)
                others = [
                    nm
                    for nm in replicas(self.nodes(), resolved.canonical, self.usage)
                    if nm[0].name not in tried
                ]
                if exc.never_connected and others:
                    log.warning("neuron %s unreachable; trying another replica", node.name)
                    continue
                raise

    def _finish(self, node: str, canonical: str, series: RequestSeries) -> None:
        self.usage.end(node, canonical)
        series.in_flight.dec()

    def _observer(
        self,
        route: str,
        node: str,
        canonical: str,
        started: float,
        on_done: Callable[[], None] = lambda: None,
    ) -> StreamObserver:
        metrics = self.metrics
        series = metrics.series(route, canonical, node)
        first: list[float] = []
        tokens: list[int] = [0, 0]  # prompt, completion (the last usage reported wins)

        def on_first_token() -> None:
            if not first:
                first.append(time.monotonic())
                series.ttft.observe(first[0] - started)

        def on_usage(usage: dict[str, Any]) -> None:
            prompt, done = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int):
                tokens[0] = prompt
            if isinstance(done, int):
                tokens[1] = done

        def on_end(error: str | None) -> None:
            self._finish(node, canonical, series)
            on_done()
            ended = time.monotonic()
            elapsed = ended - started
            status = "error" if error else "ok"
            series.duration.observe(elapsed)
            (series.error if error else series.ok).inc()
            prompt, done = tokens
            if prompt:
                series.prompt_tokens.inc(prompt)
            if done:
                series.completion_tokens.inc(done)
            if error:
                metrics.errors.labels(route, code_label(error)).inc()
                self.recent_errors.add(route, canonical, node, error)
            if first and done > 1 and ended > first[0]:
                series.tokens_per_second.observe((done - 1) / (ended - first[0]))
            if request_log.isEnabledFor(logging.INFO):  # skip building the line when off
                request_log.info(
                    route,
                    extra={
                        "fields": {
                            "model": canonical,
                            "node": node,
                            "status": status,
                            "code": error,
                            "prompt_tokens": prompt,
                            "completion_tokens": done,
                            "ttft_s": round(first[0] - started, 4) if first else None,
                            "duration_s": round(elapsed, 4),
                        }
                    },
                )

        return StreamObserver(on_first_token, on_usage, on_end)
