"""The gateway as one object: its parts, built together, and its lifecycle.

``Gateway(config, models, strategy)`` is complete when it returns: the fleet view, the scheduler
(the one owner of scheduling state: :mod:`cortex.gateway.scheduler`), the dispatcher (the one
request mechanism: :mod:`cortex.gateway.dispatch`), the metrics and the request recorder all
exist, and nothing is ``None`` until :meth:`Gateway.start`. ``start`` only opens what needs the
running event loop (the HTTP session of :mod:`cortex.gateway.transport`), polls the neurons
once and starts the pollers and the maintenance loop; ``stop`` undoes that.

The rest of the module is the views the HTTP routes show: the catalogue, the health summary and
the metrics label of a model a client named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from cortex.auth import GatewayAuth, read_token
from cortex.config import ConfigError, CortexConfig, ModelsConfig
from cortex.eviction import EvictionStrategy
from cortex.gateway.accounting import Accounting
from cortex.gateway.catalogue import build_catalogue
from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.fleet import Fleet
from cortex.gateway.limits import Limits
from cortex.gateway.metrics import OTHER, GatewayMetrics
from cortex.gateway.nodes import NodeState
from cortex.gateway.recent_errors import RecentErrors
from cortex.gateway.router import Resolved, Resolver
from cortex.gateway.scheduler import Scheduler
from cortex.gateway.tally import Recorder
from cortex.gateway.transport import Transport
from cortex.gateway.usage_store import PostgresStore, SqliteStore, UsageStore
from cortex.wire.errors import ApiError

log = logging.getLogger(__name__)


def open_store(config: CortexConfig) -> UsageStore | None:
    """The usage store ``[usage]`` names (nothing is connected yet: the first sync does it, so
    a database that is down at start does not stop the gateway)."""
    usage = config.usage
    if usage.store == "off":
        return None
    if usage.store == "postgres":
        dsn = os.environ.get(usage.dsn_env, "").strip()
        if not dsn:
            raise ConfigError(
                f"[usage] store = 'postgres': the environment variable {usage.dsn_env} "
                "(dsn_env) is not set or empty"
            )
        return PostgresStore(dsn)
    return SqliteStore(config.usage_path())


def load_strategy(name: str) -> EvictionStrategy:
    """The eviction strategy named in ``[eviction] strategy`` (a plugin), or a clear error."""
    from cortex.plugins import get_registry

    strategies = get_registry().eviction_strategies()
    if name not in strategies:
        known = ", ".join(sorted(strategies))
        raise ValueError(f"[eviction] strategy {name!r} is not registered (known: {known})")
    return strategies[name]


class Gateway:
    """See the module docstring."""

    def __init__(
        self,
        config: CortexConfig,
        models: ModelsConfig,
        strategy: EvictionStrategy,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        g = config.gateway
        self.config = config
        self.models = models
        self.strategy = strategy
        self.metrics = metrics or GatewayMetrics()
        self.resolver = Resolver(models)
        # The shared token every call to a neuron carries (None: neurons run without one).
        neuron_token = read_token(
            config.auth.neuron_token_env, os.environ, "[auth] neuron_token_env"
        )
        self.transport = Transport(config, neuron_token)
        self.fleet = Fleet(
            config.neurons,
            self.transport,
            poll_interval=g.poll_interval.seconds or 2.0,
            down_after=g.down_after_failures,
            request_timeout=g.connect_timeout.seconds or 5.0,
            on_health_change=self._health_changed,
            call_timeout=g.idle_timeout.seconds,
            load_timeout=g.load_timeout.seconds,
            retry_after=float(g.retry_after),
        )
        for name in self.fleet.nodes:
            self.metrics.node_up.labels(name).set(0)
        self.scheduler = Scheduler(
            config, models, strategy, self.fleet, self.metrics, lambda: self.default_source
        )
        self.dispatcher = Dispatcher(
            config, self.scheduler, self.transport, self.metrics, self.resolve
        )
        self.recent_errors = RecentErrors()  # /admin/status and the dashboard
        self.recorder = Recorder(self.metrics, self.model_label, self.recent_errors)
        self._maintenance: asyncio.Task[None] | None = None  # the loop start() runs
        # Keys with names and limits, and usage accounting (install_keys; None: auth off).
        self.limits: Limits | None = None
        self.accounting: Accounting | None = None

    def install_keys(self, auth: GatewayAuth) -> None:
        """The keys the gateway accepts (:mod:`cortex.auth`): per-key limits, and usage
        accounting in ``[usage] store``. A no-op with auth off: there is no key to account to,
        and the request path stays as it was."""
        if not auth.enabled or self.limits is not None:
            return
        self.limits = Limits(auth.accounts())
        self.accounting = Accounting(
            open_store(self.config),
            self.limits,
            self.metrics,
            self.config.usage.flush_interval.seconds or 1.0,
        )
        self.recorder.limits = self.limits
        self.recorder.accounting = self.accounting
        self.dispatcher.limits = self.limits
        self.dispatcher.default_source = lambda: self.default_source

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.open()
        if self.accounting is not None:
            await self.accounting.start()
        await self.fleet.poll_all()
        self.fleet.start()
        self._maintenance = asyncio.create_task(self._maintain(), name="gateway-maintenance")

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._maintenance
        await self.fleet.stop()
        for task in list(self.scheduler.loads.values()):
            task.cancel()
        if self.accounting is not None:
            await self.accounting.stop()  # what is left is written before the process ends
        await self.transport.close()

    def _health_changed(self, node: NodeState) -> None:
        self.metrics.node_up.labels(node.name).set(1 if node.up else 0)

    async def _maintain(self) -> None:
        interval = min(self.config.gateway.poll_interval.seconds or 2.0, 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.scheduler.maintain()
            except Exception:
                log.exception("maintenance failed")

    # ---- views ------------------------------------------------------------------------------

    @property
    def default_source(self) -> str:
        return self.fleet.default_source(self.config.gateway.default_source)

    def resolve(self, requested: str) -> Resolved:
        """A client's model name -> alias target, canonical id, profile (typed 400/404)."""
        return self.resolver(requested, self.default_source)

    def nodes(self) -> list[NodeState]:
        return list(self.fleet.nodes.values())

    def catalogue(self) -> list[dict[str, Any]]:
        entries = build_catalogue(
            self.nodes(), self.models, self.scheduler.usage, self.default_source
        )
        failures = self.scheduler.failures
        for entry in entries:
            failure = failures.get(entry["id"])
            if failure is not None and entry["state"] not in ("ready", "loading"):
                entry["state"] = "failed"  # the gateway's last load failed: say why
                entry["error"] = failure.to_json()
        return entries

    def health(self) -> dict[str, Any]:
        usage = self.scheduler.usage
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
                    "in_flight": usage.node_busy(node.name),
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
            "loads_in_progress": self.scheduler.loads_in_progress(),
            "nodes": nodes,
        }

    def model_label(self, requested: object) -> str:
        """The canonical id of a model the gateway knows (models.toml, an alias, loaded on a
        neuron), else ``other``: a metrics label no client can multiply."""
        if not isinstance(requested, str) or not requested:
            return OTHER
        try:
            resolved = self.resolve(requested)
        except ApiError:
            return OTHER
        return resolved.canonical if self.scheduler.known(resolved)[0] else OTHER
