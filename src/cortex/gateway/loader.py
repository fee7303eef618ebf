"""Carrying out routing decisions: cold loads, evictions, keep_alive unloads, defrag.

One cold load per model at a time: the first request that finds a model cold starts the load,
every request that arrives meanwhile awaits the same task (each bounded by the load timeout), and
none starts a second one. Placement runs under one lock, so two loads never plan with the same
free memory; memory a load will take is reserved until the neuron reports the model.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from cortex.config import CortexConfig, ModelProfile, ModelsConfig
from cortex.eviction import EvictionStrategy
from cortex.gateway.events import RecentEvents
from cortex.gateway.fleet import Fleet
from cortex.gateway.metrics import GatewayMetrics, eviction_reason
from cortex.gateway.neuron_client import post_json
from cortex.gateway.nodes import READY, NodeState
from cortex.gateway.redact import public, public_message
from cortex.gateway.router import (
    Placement,
    Resolved,
    find_profile,
    node_allowed,
    node_capable,
    place,
    replicas,
)
from cortex.gateway.usage import Usage
from cortex.wire.errors import ApiError

log = logging.getLogger(__name__)


MAX_LOAD_BACKOFF = 300.0


class LoadFailure:
    """A failed load: its error, and how long the next request waits before trying again
    (``base`` doubled per failure in a row, at most :data:`MAX_LOAD_BACKOFF`) -- so a broken
    model is not loaded again by every request that names it."""

    def __init__(self, error: ApiError, attempts: int, base: float) -> None:
        self.error = error
        self.attempts = attempts
        self.backoff = min(MAX_LOAD_BACKOFF, base * 2 ** (attempts - 1))
        self.until = time.monotonic() + self.backoff

    def blocking(self) -> bool:
        return time.monotonic() < self.until

    def again(self) -> ApiError:
        """The same error (status, code, message), with Retry-After = the backoff left."""
        e = self.error
        left = max(1.0, self.until - time.monotonic())
        return ApiError(
            e.status,
            e.code,
            e.message,
            param=e.param,
            retry_after=left,
            details=e.details,
            error_type=e.error_type,
        )

    def to_json(self, public: bool = True) -> dict[str, object]:
        """For ``/v1/models`` (``public``: redacted, :mod:`cortex.gateway.redact`), or in full
        for the admin API and ``cortex status``."""
        message = self.error.message
        return {
            "code": self.error.code,
            "message": public_message(message) if public else message,
            "attempts": self.attempts,
            "retry_in": round(max(0.0, self.until - time.monotonic()), 1),
        }


class Loader:
    def __init__(
        self,
        config: CortexConfig,
        models: ModelsConfig,
        fleet: Fleet,
        usage: Usage,
        strategy: EvictionStrategy,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        default_source: str,
    ) -> None:
        self.config = config
        self.models = models
        self.fleet = fleet
        self.usage = usage
        self.strategy = strategy
        self.session = session
        self.metrics = metrics
        self.default_source = default_source
        self.loads: dict[str, asyncio.Task[str]] = {}
        self.events = RecentEvents()
        # The last failed load of each model, until one succeeds (backoff and /v1/models).
        self.failures: dict[str, LoadFailure] = {}
        self.cycles: dict[str, int] = dict.fromkeys(fleet.nodes, 0)
        self._placement_lock = asyncio.Lock()
        self._estimates: dict[str, int] = {}
        g = config.gateway
        self._retry_after = float(g.retry_after)
        self._load_timeout = g.load_timeout.seconds
        self._admin_timeout = aiohttp.ClientTimeout(
            total=g.idle_timeout.seconds, sock_connect=g.connect_timeout.seconds
        )
        self._load_http_timeout = aiohttp.ClientTimeout(
            total=self._load_timeout, sock_connect=g.connect_timeout.seconds
        )

    # ---- cold loads -------------------------------------------------------------------------

    async def ensure_loaded(self, resolved: Resolved) -> str:
        """Load the model somewhere (or join the load in progress); returns the node name.
        After a failed load, requests get that load's error until its backoff has passed."""
        task = self.loads.get(resolved.canonical)
        if task is None:
            failure = self.failures.get(resolved.canonical)
            if failure is not None and failure.blocking():
                raise public(failure.again())
            task = asyncio.create_task(self._load(resolved), name=f"load {resolved.canonical}")
            self.loads[resolved.canonical] = task
            task.add_done_callback(lambda t: self._load_done(resolved.canonical, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._load_timeout)
        except ApiError as exc:
            # The load this request waited on failed: the same answer every later request gets
            # until the backoff passes (Retry-After included; the first waiters had none).
            failure = self.failures.get(resolved.canonical)
            if failure is not None and failure.error is exc:
                raise public(failure.again()) from None
            raise public(exc) from None
        except TimeoutError:
            raise ApiError(
                503,
                "load_timeout",
                f"model {resolved.requested!r} is still loading after "
                f"{self._load_timeout:g}s; try again shortly",
                retry_after=self._retry_after,
            ) from None

    def _load_done(self, canonical: str, task: asyncio.Task[str]) -> None:
        self.loads.pop(canonical, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.failures.pop(canonical, None)
            return
        if not isinstance(error, ApiError):
            error = ApiError(502, "load_failed", f"loading {canonical} failed: {error}")
        previous = self.failures.get(canonical)
        attempts = previous.attempts + 1 if previous is not None else 1
        self.failures[canonical] = LoadFailure(error, attempts, self._retry_after)
        log.warning(
            "loading %s failed (attempt %d, next try in %.0fs): %s",
            canonical,
            attempts,
            self.failures[canonical].backoff,
            error.message,
        )

    async def _needed_bytes(self, resolved: Resolved) -> int:
        """The profile's memory_mb, else the neuron's preflight estimate (cached)."""
        profile = resolved.profile
        if profile is not None and profile.memory_mb is not None:
            return profile.memory_mb * 2**20
        if resolved.canonical in self._estimates:
            return self._estimates[resolved.canonical]
        for node in self.fleet.up_nodes():
            if not node_allowed(profile, node):
                continue
            if node_capable(profile, node, resolved.canonical) is not None:
                continue
            payload = load_payload(resolved.canonical, profile)
            answer = await post_json(
                self.session,
                f"{node.endpoint}/models/estimate",
                payload,
                self._admin_timeout,
                retry_after=self._retry_after,
            )
            needed = int(answer.get("memory_bytes") or 0)
            self._estimates[resolved.canonical] = needed
            return needed
        return 0

    async def _load(self, resolved: Resolved) -> str:
        needed = await self._needed_bytes(resolved)
        async with self._placement_lock:
            # The estimate and the lock were awaits: a poll may have seen the model become ready
            # meanwhile (a load on the neuron this gateway joined late, or another gateway's).
            # Use that copy; placing another would load a duplicate on a second node.
            ready = [
                nm
                for nm in replicas(list(self.fleet.nodes.values()), resolved.canonical, self.usage)
                if node_allowed(resolved.profile, nm[0])  # `cortex load --node` means that node
            ]
            if ready:
                return ready[0][0].name
            try:
                placement = self._place(resolved, needed)
            except ApiError as exc:
                if exc.code != "insufficient_memory":
                    raise
                # In-flight counts from the last poll may be stale (a request that just ended):
                # look again before telling the client to come back later.
                await self.fleet.poll_all()
                placement = self._place(resolved, needed)
            if placement.victims:
                # Victims are chosen from last-use times and in-flight counts: plan again on a
                # fresh view of that node (a poll can be a request behind), never on a stale one.
                await self.fleet.refresh(placement.node)
                placement = self._place(resolved, needed)
            node = self.fleet.nodes[placement.node]
            for victim in placement.victims:
                self.usage.evicting.add((node.name, victim))
            # a multi-device replica reserves its share on each device it will span
            spans = placement.devices or (placement.device,)
            share = -(-needed // len(spans))
            tokens = [self.usage.reserve(node.name, d, resolved.canonical, share) for d in spans]
        try:
            if placement.victims:
                await self._evict(node, placement)
            return await self._start_load(node, placement, resolved)
        finally:
            for token in tokens:
                self.usage.release(token)

    def _place(self, resolved: Resolved, needed: int) -> Placement:
        return place(
            resolved,
            needed,
            list(self.fleet.nodes.values()),
            self.usage,
            self.strategy,
            self.models,
            self.default_source,
            retry_after=self._retry_after,
        )

    async def _evict(self, node: NodeState, placement: Placement) -> None:
        try:
            for victim in placement.victims:
                log.info("evicting %s from %s to make room", victim, node.name)
                await self._unload(node, victim, reason="make_room")
        finally:
            for victim in placement.victims:
                self.usage.evicting.discard((node.name, victim))
            await self.fleet.refresh(node.name)

    async def _start_load(self, node: NodeState, placement: Placement, resolved: Resolved) -> str:
        profile = resolved.profile
        payload = {**load_payload(resolved.canonical, profile), "device": placement.device}
        started = time.monotonic()
        outcome, error = "failed", None
        log.info("loading %s on %s/%s", resolved.canonical, node.name, placement.device)
        try:
            await post_json(
                self.session,
                f"{node.endpoint}/models/load",
                payload,
                self._load_http_timeout,
                retry_after=self._retry_after,
            )
            outcome = "ok"
        except ApiError as exc:
            error = exc.code
            raise
        finally:
            took = time.monotonic() - started
            self.metrics.cold_loads.labels(resolved.canonical, node.name, outcome).inc()
            self.metrics.load_duration.labels(resolved.canonical, node.name).observe(took)
            self.events.load(resolved.canonical, node.name, outcome, took, error)
            self.cycles[node.name] += 1
            await self.fleet.refresh(node.name)
        self.usage.touch(node.name, resolved.canonical)
        return node.name

    async def unload(self, node: NodeState, model_id: str, reason: str) -> None:
        """Unload ``model_id`` from ``node`` (an operator's ``/admin/models/unload``).

        From the moment it starts until the fleet view shows the result, routing treats the
        model as gone from that node (as for an eviction): a request arriving meanwhile goes to
        another replica, or loads the model again, instead of being sent to a copy that is
        being unloaded (the neuron answered it 409)."""
        key = (node.name, model_id)
        marked = key not in self.usage.evicting  # an eviction may hold the mark already
        self.usage.evicting.add(key)
        try:
            await self._unload(node, model_id, reason)
            await self.fleet.refresh(node.name)
        finally:
            if marked:
                self.usage.evicting.discard(key)

    async def _unload(self, node: NodeState, model_id: str, reason: str) -> None:
        try:
            await post_json(
                self.session,
                f"{node.endpoint}/models/unload",
                {"model_id": model_id},
                self._admin_timeout,
                retry_after=self._retry_after,
            )
        except ApiError as exc:
            if exc.code != "model_not_found":
                raise
        shown = eviction_reason(reason)
        self.metrics.evictions.labels(model_id, node.name, shown).inc()
        self.events.eviction(model_id, node.name, shown)
        self.cycles[node.name] += 1

    # ---- maintenance: keep_alive and defrag -------------------------------------------------

    async def unload_idle(self, now: float | None = None) -> list[tuple[str, str]]:
        """Unload every model idle longer than its profile's ``keep_alive`` (never pinned ones,
        never one with a request in flight). Returns what was unloaded."""
        now = time.time() if now is None else now
        unloaded = []
        for node in self.fleet.up_nodes():
            for m in node.models:
                profile = find_profile(self.models, m.id, self.default_source)
                if profile is None or profile.pinned or profile.keep_alive.seconds is None:
                    continue
                key = (node.name, m.id)
                if m.state != READY or key in self.usage.evicting:
                    continue
                if m.in_flight or self.usage.busy(*key):
                    continue
                idle_since = max(m.last_used, m.loaded_at, self.usage.last_used.get(key, 0.0))
                if now - idle_since < profile.keep_alive.seconds:
                    continue
                log.info("unloading %s from %s: idle past keep_alive", m.id, node.name)
                self.usage.evicting.add(key)
                try:
                    await self._unload(node, m.id, reason="keep_alive")
                    unloaded.append(key)
                except ApiError as exc:
                    log.warning("keep_alive unload of %s on %s failed: %s", m.id, node.name, exc)
                finally:
                    self.usage.evicting.discard(key)
            if any(k[0] == node.name for k in unloaded):
                await self.fleet.refresh(node.name)
        return unloaded

    async def defrag_idle_nodes(self) -> list[str]:
        """Ask idle nodes past ``defrag_after_cycles`` load/unload cycles to release memory."""
        threshold = self.config.eviction.defrag_after_cycles
        if threshold <= 0:
            return []
        done = []
        for node in self.fleet.up_nodes():
            if self.cycles[node.name] < threshold:
                continue
            if self.usage.node_busy(node.name) or self.usage.loading_on(node.name):
                continue
            if any(m.in_flight for m in node.models) or any(
                t for t in self.loads.values() if not t.done()
            ):
                continue
            try:
                await post_json(
                    self.session,
                    f"{node.endpoint}/admin/release-memory",
                    {},
                    self._admin_timeout,
                    retry_after=self._retry_after,
                )
            except ApiError as exc:
                log.warning("release-memory on %s failed: %s", node.name, exc)
                continue
            self.cycles[node.name] = 0
            self.metrics.defrags.labels(node.name).inc()
            done.append(node.name)
        return done


def load_payload(canonical: str, profile: ModelProfile | None) -> dict[str, object]:
    """What ``/models/estimate`` and ``/models/load`` get for a model: its id and what its
    ``models.toml`` profile chose (harness, quant, batching capacity)."""
    payload: dict[str, object] = {"model_id": canonical}
    if profile is not None:
        for key in ("harness", "quant", "max_batch", "kv_tokens", "devices"):
            value = getattr(profile, key)
            if value:
                payload[key] = value
    return payload
