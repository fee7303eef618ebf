"""The fleet view: a poller that keeps, per neuron, health, discovery and models.

Every neuron is asked ``GET /discovery`` and ``GET /models`` each ``poll_interval``, by a poll
loop of its own (one asyncio task per neuron: poll, then sleep), so a neuron that hangs never
delays the polls of the others. A poll is bounded by ``request_timeout`` (connect_timeout), so a
neuron that stops answering is down within ``down_after x (poll_interval + request_timeout)``
(docs/gateway.md). The gateway also refreshes a node right after it loads or unloads there, so
routing never acts on a view older than its own last action. A poll result older than one
already applied is dropped (two polls can overlap when a refresh races the periodic one).

The fleet is also how the gateway acts on neurons: the scheduler's side effects (estimate, load,
unload, release memory, refresh) go out through the methods below, which implement
:class:`cortex.gateway.scheduler.Neurons` (the scheduler's tests use a fake of it, no sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from cortex.config import NeuronRef
from cortex.gateway.neuron_client import post_json
from cortex.gateway.nodes import (
    Discovery,
    Health,
    NodeAnswerError,
    NodeModel,
    NodeState,
    parse_models,
)
from cortex.gateway.transport import Transport

log = logging.getLogger(__name__)

HealthListener = Callable[[NodeState], None]

# What a neuron that is down, stopping or misbehaving makes a poll raise (logged without a trace).
_EXPECTED_POLL_ERRORS = (aiohttp.ClientError, TimeoutError, NodeAnswerError, ValueError)


class Fleet:
    """The live view of every configured neuron."""

    def __init__(
        self,
        neurons: list[NeuronRef],
        client: Transport | aiohttp.ClientSession,
        *,
        poll_interval: float = 2.0,
        down_after: int = 3,
        request_timeout: float = 5.0,
        on_health_change: HealthListener | None = None,
        call_timeout: float | None = None,
        load_timeout: float | None = None,
        retry_after: float = 5.0,
    ) -> None:
        self.nodes: dict[str, NodeState] = {
            n.name: NodeState(n.name, n.endpoint.rstrip("/"), Health(down_after=down_after))
            for n in neurons
        }
        self._client = client
        # the admin calls: estimate, unload, release memory (call_timeout) and loads
        self._call_timeout = aiohttp.ClientTimeout(total=call_timeout, sock_connect=request_timeout)
        self._load_timeout = aiohttp.ClientTimeout(total=load_timeout, sock_connect=request_timeout)
        self._retry_after = retry_after
        self._background: set[asyncio.Task[Any]] = set()
        self._poll_interval = poll_interval
        self._timeout_s = request_timeout
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._on_health_change = on_health_change
        self._applied: dict[str, float] = dict.fromkeys(self.nodes, 0.0)
        self._tasks: dict[str, asyncio.Task[None]] = {}
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

    @property
    def session(self) -> aiohttp.ClientSession:
        client = self._client
        return client if isinstance(client, aiohttp.ClientSession) else client.session

    async def _get_json(self, url: str) -> object:
        async with self.session.get(url, timeout=self._timeout) as resp:
            if resp.status != 200:
                raise NodeAnswerError(f"GET {url} answered {resp.status}")
            return await resp.json(content_type=None)

    async def refresh(self, name: str) -> NodeState:
        """Poll one neuron now and apply the answer (unless a newer one was applied meanwhile)."""
        node = self.nodes[name]
        started = time.monotonic()
        try:
            # aiohttp's total timeout bounds each GET; this bounds the poll as a whole, so the
            # down bound in docs/gateway.md holds whatever the transport does.
            async with asyncio.timeout(self._timeout_s):
                discovery_json, models_json = await asyncio.gather(
                    self._get_json(f"{node.endpoint}/discovery"),
                    self._get_json(f"{node.endpoint}/models"),
                )
            discovery = Discovery.from_json(discovery_json)
            models = parse_models(models_json)
        except Exception as exc:  # every failed poll is a miss, or a node could never go down
            if not isinstance(exc, _EXPECTED_POLL_ERRORS):
                log.warning("poll of neuron %s failed unexpectedly", name, exc_info=exc)
            if started >= self._applied[name]:
                self._applied[name] = started
                self._record(node, error=self._describe(exc))
            return node
        if started >= self._applied[name]:
            self._applied[name] = started
            self._record(node, discovery=discovery, models=models)
        return node

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"TimeoutError: no answer within {self._timeout_s:g}s"
        return f"{type(exc).__name__}: {exc}".rstrip(": ")

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
        """Poll every neuron once, together (start-up, and callers that need a fresh view)."""
        await asyncio.gather(*(self.refresh(name) for name in self.nodes))

    def refresh_soon(self, name: str) -> None:
        """Poll one neuron now, without waiting for the answer (a request found it unreachable
        or its view stale)."""
        task = asyncio.get_running_loop().create_task(self.refresh(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh_within(self, names: Iterable[str], seconds: float) -> None:
        """Poll ``names`` together and wait up to ``seconds`` for them: a neuron that is slow to
        answer keeps the view it had (its poll finishes in the background, within
        connect_timeout), so one hanging neuron never holds up a placement for long."""
        tasks = [asyncio.get_running_loop().create_task(self.refresh(n)) for n in names]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- actions on neurons (the scheduler's side effects) ----------------------------------

    async def _post(
        self, name: str, route: str, payload: dict[str, Any], load: bool = False
    ) -> dict[str, Any]:
        return await post_json(
            self.session,
            f"{self.nodes[name].endpoint}{route}",
            payload,
            self._load_timeout if load else self._call_timeout,
            retry_after=self._retry_after,
        )

    async def estimate(self, name: str, payload: dict[str, Any]) -> int:
        """``POST /models/estimate``: the bytes a load of ``payload`` would need there."""
        answer = await self._post(name, "/models/estimate", payload)
        return int(answer.get("memory_bytes") or 0)

    async def load(self, name: str, payload: dict[str, Any]) -> None:
        """``POST /models/load`` and wait until it is ready (or failed: an ApiError)."""
        await self._post(name, "/models/load", payload, load=True)

    async def unload(self, name: str, model_id: str) -> None:
        """``POST /models/unload`` (the neuron lets requests in flight finish first)."""
        await self._post(name, "/models/unload", {"model_id": model_id})

    async def release_memory(self, name: str) -> None:
        """``POST /admin/release-memory``: give cached allocator memory back while idle."""
        await self._post(name, "/admin/release-memory", {})

    async def _poll_loop(self, name: str) -> None:
        """One neuron's poller: refresh, sleep, forever; never waits on another neuron."""
        while True:
            try:
                await self.refresh(name)
            except Exception:  # never let one bad poll end the poller
                log.exception("poll of neuron %s failed", name)
            await asyncio.sleep(self._poll_interval)

    def start(self) -> None:
        """Start one poll loop per neuron (call from the running event loop)."""
        for name in self.nodes:
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(
                    self._poll_loop(name), name=f"fleet-poller {name}"
                )

    async def stop(self) -> None:
        """Cancel every poll loop (and background poll) and wait for them to end."""
        tasks, self._tasks = [*self._tasks.values(), *self._background], {}
        self._background = set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
