"""The fleet view: a poller that keeps, per neuron, health, discovery and models.

Every neuron is asked ``GET /discovery`` and ``GET /models`` each ``poll_interval``. The gateway
also refreshes a node right after it loads or unloads there, so routing never acts on a view
older than its own last action. A poll result older than one already applied is dropped (two
polls can overlap when a refresh races the periodic one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from cortex.config import NeuronRef
from cortex.gateway.nodes import (
    Discovery,
    Health,
    NodeAnswerError,
    NodeModel,
    NodeState,
    parse_models,
)

log = logging.getLogger(__name__)

HealthListener = Callable[[NodeState], None]


class Fleet:
    """The live view of every configured neuron."""

    def __init__(
        self,
        neurons: list[NeuronRef],
        session: aiohttp.ClientSession,
        *,
        poll_interval: float = 2.0,
        down_after: int = 3,
        request_timeout: float = 5.0,
        on_health_change: HealthListener | None = None,
    ) -> None:
        self.nodes: dict[str, NodeState] = {
            n.name: NodeState(n.name, n.endpoint.rstrip("/"), Health(down_after=down_after))
            for n in neurons
        }
        self._session = session
        self._poll_interval = poll_interval
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._on_health_change = on_health_change
        self._applied: dict[str, float] = dict.fromkeys(self.nodes, 0.0)
        self._task: asyncio.Task[None] | None = None
        self._default_source: str | None = None

    # ---- views ------------------------------------------------------------------------------

    def up_nodes(self) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.up]

    def default_source(self, configured: str | None) -> str:
        """The scheme of bare ids: configured, else what most healthy neurons use (computed
        once per change of the fleet view, not per request)."""
        if configured:
            return configured
        if self._default_source is None:
            self._default_source = self._most_used_default_source()
        return self._default_source

    def _most_used_default_source(self) -> str:
        counts: dict[str, int] = {}
        for node in self.up_nodes():
            assert node.discovery is not None
            counts[node.discovery.default_source] = counts.get(node.discovery.default_source, 0) + 1
        if not counts:
            return "huggingface"
        return max(sorted(counts), key=lambda s: counts[s])

    # ---- polling ----------------------------------------------------------------------------

    async def _get_json(self, url: str) -> object:
        async with self._session.get(url, timeout=self._timeout) as resp:
            if resp.status != 200:
                raise NodeAnswerError(f"GET {url} answered {resp.status}")
            return await resp.json(content_type=None)

    async def refresh(self, name: str) -> NodeState:
        """Poll one neuron now and apply the answer (unless a newer one was applied meanwhile)."""
        node = self.nodes[name]
        started = time.monotonic()
        try:
            discovery_json, models_json = await asyncio.gather(
                self._get_json(f"{node.endpoint}/discovery"),
                self._get_json(f"{node.endpoint}/models"),
            )
            discovery = Discovery.from_json(discovery_json)
            models = parse_models(models_json)
        except (aiohttp.ClientError, TimeoutError, NodeAnswerError, ValueError) as exc:
            if started >= self._applied[name]:
                self._applied[name] = started
                self._record(node, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
            return node
        if started >= self._applied[name]:
            self._applied[name] = started
            self._record(node, discovery=discovery, models=models)
        return node

    def _record(
        self,
        node: NodeState,
        *,
        discovery: Discovery | None = None,
        models: tuple[NodeModel, ...] = (),
        error: str | None = None,
    ) -> None:
        self._default_source = None  # the view changed: recount on next use
        if error is None:
            node.discovery = discovery
            node.models = models
            node.refreshed_at = time.time()
            changed = node.health.record_success()
        else:
            changed = node.health.record_failure(error)
            if changed:
                log.warning("neuron %s is down: %s", node.name, error)
        if changed and self._on_health_change is not None:
            self._on_health_change(node)
        if changed and node.up:
            log.info("neuron %s is up", node.name)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.refresh(name) for name in self.nodes))

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # never let one bad poll end the poller
                log.exception("fleet poll failed")
            await asyncio.sleep(self._poll_interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
