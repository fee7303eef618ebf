"""The gateway's scheduler: the one owner of every scheduling decision and of the state behind it.

Usage (requests in flight per node and model, last use, models being unloaded, memory reserved
by loads in progress), admission (the per-model gates and queues), the per-node cap, cold loads
(one per model at a time), failed-load backoff, the estimate cache, eviction, keep_alive,
defrag, and the placement lock all live here and nowhere else. Decisions are the pure functions
of :mod:`cortex.gateway.router`; side effects (estimate, load, unload, release memory, refresh
the view) go out through :class:`Neurons`, which :class:`cortex.gateway.fleet.Fleet` implements
and ``tests/gateway/test_scheduler.py`` fakes (no sockets).

A request gets a :class:`Lease` from :meth:`Scheduler.acquire`; giving the lease back
(:meth:`Lease.release`) is the only way to end its admission slot and its in-flight count, and it
is idempotent, so whichever path ends a request (answer over, client gone, error) ends it once.

The design note beside this file (``scheduler.md``) says why it is shaped this way and what two
gateways in front of the same neurons share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cortex.config import CortexConfig, ModelProfile, ModelsConfig
from cortex.eviction import EvictionStrategy
from cortex.gateway.admission import Admission, Slot
from cortex.gateway.events import RecentEvents
from cortex.gateway.metrics import OTHER, GatewayMetrics, eviction_reason
from cortex.gateway.nodes import LOADING, READY, NodeState
from cortex.gateway.redact import public, public_message
from cortex.gateway.router import (
    Placement,
    Resolved,
    find_profile,
    known_on,
    least_busy,
    node_allowed,
    node_capable,
    place,
    replicas,
)
from cortex.gateway.usage import Usage
from cortex.wire.errors import ApiError, model_not_found

log = logging.getLogger(__name__)

MAX_ROUTING_ATTEMPTS = 3
MAX_LOAD_BACKOFF = 300.0
# How long a placement waits for the fresh view of the candidate nodes it polls first.
PLACEMENT_REFRESH_S = 1.0
# The code of an answer that says the model is no longer where the view put it (proxy.py).
MODEL_UNLOADED = "model_unloaded"


class Neurons(Protocol):
    """What the scheduler needs of the fleet: the view it decides on, and the actions it takes.

    Implemented by :class:`cortex.gateway.fleet.Fleet` over HTTP; tests use a fake that keeps
    the view in memory and applies loads and unloads to it."""

    nodes: dict[str, NodeState]

    def up_nodes(self) -> list[NodeState]: ...

    async def refresh(self, name: str) -> Any: ...

    def refresh_soon(self, name: str) -> None: ...

    async def refresh_within(self, names: Iterable[str], seconds: float) -> None: ...

    async def estimate(self, name: str, payload: dict[str, Any]) -> int: ...

    async def load(self, name: str, payload: dict[str, Any]) -> None: ...

    async def unload(self, name: str, model_id: str) -> None: ...

    async def release_memory(self, name: str) -> None: ...


class UpstreamGone(Protocol):
    """What :meth:`Lease.reroute` needs of the error a neuron call ended with."""

    code: str
    never_connected: bool


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


def load_payload(canonical: str, profile: ModelProfile | None) -> dict[str, object]:
    """What ``/models/estimate`` and ``/models/load`` get for a model: its id and what its
    ``models.toml`` profile chose (harness, quant, context, batching capacity)."""
    payload: dict[str, object] = {"model_id": canonical}
    if profile is not None:
        for key in ("harness", "quant", "context_length", "max_batch", "kv_tokens", "devices"):
            value = getattr(profile, key)
            if value:
                payload[key] = value
    return payload


_NO_SLOT = Slot(None)


class Lease:
    """One request's hold on the fleet: its admission slot and its in-flight count on
    :attr:`node`. :meth:`release` gives both back (idempotent: the first call wins)."""

    __slots__ = (
        "_held",
        "_moves",
        "_scheduler",
        "_slot",
        "_tried",
        "load_wait",
        "node",
        "queue_wait",
        "resolved",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        resolved: Resolved,
        node: NodeState,
        slot: Slot,
        queue_wait: float,
        load_wait: float,
    ) -> None:
        self._scheduler = scheduler
        self._slot = slot
        self._held = True
        self._tried: set[str] = set()
        self._moves = 0
        self.resolved = resolved
        self.node = node
        self.queue_wait = queue_wait
        self.load_wait = load_wait

    def release(self) -> None:
        """End the in-flight count on :attr:`node` and give the admission slot back."""
        if self._held:
            self._held = False
            self._scheduler.usage.end(self.node.name, self.resolved.canonical)
        self._slot.release()

    async def reroute(self, error: UpstreamGone) -> bool:
        """The neuron at :attr:`node` could not take the request before answering anything
        (unreachable, or it said the model is not there: its view was stale). Ends the count
        there and moves the lease to another node -- another ready replica, or, when the model
        was unloaded behind this gateway's back (another gateway evicted it), wherever routing
        now puts it, a cold load included. False when there is nowhere to go (the caller
        answers ``error``); the slot is kept either way until :meth:`release`."""
        scheduler = self._scheduler
        canonical = self.resolved.canonical
        name = self.node.name
        if self._held:
            self._held = False
            scheduler.usage.end(name, canonical)
        self._moves += 1
        if error.code == MODEL_UNLOADED:
            # The neuron is fine; the view of it is stale. Route again on a fresh one.
            await scheduler.neurons.refresh(name)
        else:
            self._tried.add(name)
            scheduler.neurons.refresh_soon(name)
        if not error.never_connected or self._moves > MAX_ROUTING_ATTEMPTS:
            return False
        if error.code != MODEL_UNLOADED:
            others = [
                nm
                for nm in replicas(scheduler.nodes(), canonical, scheduler.usage)
                if nm[0].name not in self._tried
            ]
            if not others:
                return False
            log.warning("neuron %s unreachable; trying another replica", name)
        node, waited = await scheduler.route(self.resolved, self._tried)
        self.node = node
        self._held = True
        self.load_wait += waited
        return True


class Scheduler:
    """See the module docstring."""

    def __init__(
        self,
        config: CortexConfig,
        models: ModelsConfig,
        strategy: EvictionStrategy,
        neurons: Neurons,
        metrics: GatewayMetrics,
        default_source: Callable[[], str],
    ) -> None:
        g = config.gateway
        self.models = models
        self.strategy = strategy
        self.neurons = neurons
        self.metrics = metrics
        self.default_source = default_source
        self.usage = Usage()
        self.retry_after = float(g.retry_after)
        self.admission = Admission(
            g.max_in_flight_per_model,
            g.model_queue_size,
            g.queue_timeout.seconds,
            self.retry_after,
            capacity=self.running_at_once,
        )
        self.node_limit = g.max_in_flight_per_node
        self.load_timeout = g.load_timeout.seconds
        self.defrag_after = config.eviction.defrag_after_cycles
        self.placement_refresh = min(PLACEMENT_REFRESH_S, g.connect_timeout.seconds or 5.0)
        self.loads: dict[str, asyncio.Task[str]] = {}
        # The last failed load of each model, until one succeeds (backoff and /v1/models).
        self.failures: dict[str, LoadFailure] = {}
        self.estimates: dict[str, int] = {}
        self.cycles: dict[str, int] = dict.fromkeys(neurons.nodes, 0)
        self.events = RecentEvents()
        self._placement_lock = asyncio.Lock()

    # ---- views ------------------------------------------------------------------------------

    def nodes(self) -> list[NodeState]:
        return list(self.neurons.nodes.values())

    def known(self, resolved: Resolved) -> tuple[bool, bool]:
        """(known at all, known only on neurons that are down)."""
        return known_on(self.nodes(), resolved)

    def loads_in_progress(self) -> list[str]:
        return sorted(self.loads)

    # ---- the request path -------------------------------------------------------------------

    async def acquire(
        self, resolved: Resolved, *, queued: bool = True, key: str | None = None
    ) -> Lease:
        """Admit the request (``queued``: through its model's gate, waiting in its queue when
        the model is at its limit; ``key``: the key's name, for fair share between keys) and
        route it: a ready replica, else a cold load first. Raises the :class:`ApiError` a
        client gets when neither can happen."""
        if queued:
            entered = time.monotonic()
            slot = await self.admission.enter(resolved.canonical, key)
            queue_wait = time.monotonic() - entered
            label = resolved.canonical if self.known(resolved)[0] else OTHER
            self.metrics.queue_wait.labels(label).observe(queue_wait)
        else:
            slot, queue_wait = _NO_SLOT, 0.0
            # Not queued behind generations, but held like them while a neuron is full.
            self.admission.budget_from(time.monotonic())
        try:
            node, load_wait = await self.route(resolved)
        except BaseException:
            slot.release()
            raise
        return Lease(self, resolved, node, slot, queue_wait, load_wait)

    def running_at_once(self, canonical: str) -> int:
        """How many generations of the model its ready replicas run at once (0: none ready)."""
        return sum(m.max_batch for _, m in replicas(self.nodes(), canonical, self.usage))

    def _pick(self, resolved: Resolved, exclude: set[str] | frozenset[str]) -> NodeState | None:
        """The least busy ready replica under the node cap, counted as in flight there at once
        (no await in between, so eviction cannot race it); None when no replica is ready."""
        usage = self.usage
        ready = replicas(self.nodes(), resolved.canonical, usage)
        if exclude:
            ready = [nm for nm in ready if nm[0].name not in exclude]
        if not ready:
            return None
        limit = self.node_limit
        room = [nm for nm in ready if usage.node_busy(nm[0].name) < limit]
        if not room:
            raise ApiError(
                503,
                "nodes_at_capacity",
                f"every neuron serving {resolved.requested!r} is at its limit of "
                f"{limit} requests in flight; retry after a moment",
                retry_after=self.retry_after,
            )
        pick = least_busy(room, resolved.canonical, usage)
        assert pick is not None
        usage.begin(pick[0].name, resolved.canonical)
        return pick[0]

    async def route(
        self, resolved: Resolved, exclude: set[str] | frozenset[str] = frozenset()
    ) -> tuple[NodeState, float]:
        """A node with the model ready, loading it first when needed, counted as in flight
        there; and the seconds spent waiting for a cold load."""
        load_wait = 0.0
        for _attempt in range(MAX_ROUTING_ATTEMPTS):
            node = self._pick(resolved, exclude)
            if node is not None:
                return node, load_wait
            known, only_down = self.known(resolved)
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
                await self.ensure_loaded(resolved)
            finally:
                load_wait += time.monotonic() - waited
        raise ApiError(
            503,
            "service_unavailable",
            f"model {resolved.requested!r} was loaded but went away before it could be used",
            retry_after=self.retry_after,
        )

    # ---- cold loads -------------------------------------------------------------------------

    async def ensure_loaded(self, resolved: Resolved) -> str:
        """Load the model somewhere (or join the load in progress); returns the node name.
        After a failed load, requests get that load's error until its backoff has passed."""
        canonical = resolved.canonical
        task = self.loads.get(canonical)
        if task is None:
            failure = self.failures.get(canonical)
            if failure is not None and failure.blocking():
                raise public(failure.again())
            task = asyncio.create_task(self._load(resolved), name=f"load {canonical}")
            self.loads[canonical] = task
            task.add_done_callback(lambda t: self._load_done(canonical, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.load_timeout)
        except ApiError as exc:
            # The load this request waited on failed: the same answer every later request gets
            # until the backoff passes (Retry-After included; the first waiters had none).
            failure = self.failures.get(canonical)
            if failure is not None and failure.error is exc:
                raise public(failure.again()) from None
            raise public(exc) from None
        except TimeoutError:
            raise ApiError(
                503,
                "load_timeout",
                f"model {resolved.requested!r} is still loading after "
                f"{self.load_timeout:g}s; try again shortly",
                retry_after=self.retry_after,
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
        self.failures[canonical] = LoadFailure(error, attempts, self.retry_after)
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
        if resolved.canonical in self.estimates:
            return self.estimates[resolved.canonical]
        for node in self.neurons.up_nodes():
            if not node_allowed(profile, node):
                continue
            if node_capable(profile, node, resolved.canonical) is not None:
                continue
            needed = await self.neurons.estimate(
                node.name, load_payload(resolved.canonical, profile)
            )
            self.estimates[resolved.canonical] = needed
            return needed
        return 0

    async def _load(self, resolved: Resolved) -> str:
        needed = await self._needed_bytes(resolved)
        async with self._placement_lock:
            # Every placement is made on a view of its candidate nodes polled just before: so
            # an in-flight count that just ended, a model that another gateway is loading (join
            # it) or has loaded (use it) or has evicted are all seen, and two gateways deciding
            # at once decide on the same view and pick the same node (scheduler.md).
            allowed = [n.name for n in self.neurons.up_nodes() if node_allowed(resolved.profile, n)]
            await self.neurons.refresh_within(allowed, self.placement_refresh)
            ready = [
                nm
                for nm in replicas(self.nodes(), resolved.canonical, self.usage)
                if node_allowed(resolved.profile, nm[0])  # `cortex load --node` means that node
            ]
            if ready:
                return ready[0][0].name
            placement = self._place(resolved, needed)
            node = self.neurons.nodes[placement.node]
            entry = node.model(resolved.canonical)
            joined = entry is not None and entry.state == LOADING
            for victim in placement.victims:
                self.usage.evicting.add((node.name, victim))
            # a multi-device replica reserves its share on each device it will span
            spans = placement.devices or (placement.device,)
            share = -(-needed // len(spans))
            tokens = [self.usage.reserve(node.name, d, resolved.canonical, share) for d in spans]
        try:
            if placement.victims:
                await self._evict(node.name, placement)
            return await self._start_load(node.name, placement, resolved, joined)
        finally:
            for token in tokens:
                self.usage.release(token)

    def _place(self, resolved: Resolved, needed: int) -> Placement:
        return place(
            resolved,
            needed,
            self.nodes(),
            self.usage,
            self.strategy,
            self.models,
            self.default_source(),
            retry_after=self.retry_after,
        )

    async def _evict(self, node: str, placement: Placement) -> None:
        try:
            for victim in placement.victims:
                log.info("evicting %s from %s to make room", victim, node)
                await self._unload(node, victim, reason="make_room")
        finally:
            for victim in placement.victims:
                self.usage.evicting.discard((node, victim))
            await self.neurons.refresh(node)

    async def _start_load(
        self, node: str, placement: Placement, resolved: Resolved, joined: bool
    ) -> str:
        payload = {**load_payload(resolved.canonical, resolved.profile), "device": placement.device}
        started = time.monotonic()
        outcome, error = "failed", None
        log.info(
            "%s %s on %s/%s",
            "joining the load of" if joined else "loading",
            resolved.canonical,
            node,
            placement.device,
        )
        try:
            await self.neurons.load(node, payload)
            outcome = "joined" if joined else "ok"
        except ApiError as exc:
            error = exc.code
            raise
        finally:
            took = time.monotonic() - started
            self.metrics.cold_loads.labels(resolved.canonical, node, outcome).inc()
            if outcome == "ok":
                self.metrics.load_duration.labels(resolved.canonical, node).observe(took)
            self.events.load(resolved.canonical, node, outcome, took, error)
            if not joined:
                self.cycles[node] += 1
            await self.neurons.refresh(node)
        self.usage.touch(node, resolved.canonical)
        return node

    # ---- unloads ----------------------------------------------------------------------------

    async def unload(self, node: str, model_id: str, reason: str) -> None:
        """Unload ``model_id`` from ``node`` (an operator's ``/admin/models/unload``).

        From the moment it starts until the fleet view shows the result, routing treats the
        model as gone from that node (as for an eviction): a request arriving meanwhile goes to
        another replica, or loads the model again, instead of being sent to a copy that is
        being unloaded (the neuron answered it 409)."""
        key = (node, model_id)
        marked = key not in self.usage.evicting  # an eviction may hold the mark already
        self.usage.evicting.add(key)
        try:
            await self._unload(node, model_id, reason)
            await self.neurons.refresh(node)
        finally:
            if marked:
                self.usage.evicting.discard(key)

    async def _unload(self, node: str, model_id: str, reason: str) -> None:
        try:
            await self.neurons.unload(node, model_id)
        except ApiError as exc:
            if exc.code != "model_not_found":  # gone already (another gateway): the same result
                raise
        shown = eviction_reason(reason)
        self.metrics.evictions.labels(model_id, node, shown).inc()
        self.events.eviction(model_id, node, shown)
        self.cycles[node] += 1

    # ---- maintenance: keep_alive and defrag -------------------------------------------------

    async def maintain(self) -> None:
        """One round of the periodic work: keep_alive unloads, then defrag of idle nodes."""
        await self.unload_idle()
        await self.defrag_idle_nodes()

    async def unload_idle(self, now: float | None = None) -> list[tuple[str, str]]:
        """Unload every model idle longer than its profile's ``keep_alive`` (never pinned ones,
        never one with a request in flight). Returns what was unloaded."""
        now = time.time() if now is None else now
        unloaded = []
        default_source = self.default_source()
        for node in self.neurons.up_nodes():
            for m in node.models:
                profile = find_profile(self.models, m.id, default_source)
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
                    await self._unload(node.name, m.id, reason="keep_alive")
                    unloaded.append(key)
                except ApiError as exc:
                    log.warning("keep_alive unload of %s on %s failed: %s", m.id, node.name, exc)
                finally:
                    self.usage.evicting.discard(key)
            if any(k[0] == node.name for k in unloaded):
                await self.neurons.refresh(node.name)
        return unloaded

    async def defrag_idle_nodes(self) -> list[str]:
        """Ask idle nodes past ``defrag_after_cycles`` load/unload cycles to release memory."""
        if self.defrag_after <= 0:
            return []
        done = []
        for node in self.neurons.up_nodes():
            if self.cycles.get(node.name, 0) < self.defrag_after:
                continue
            if self.usage.node_busy(node.name) or self.usage.loading_on(node.name):
                continue
            if any(m.in_flight for m in node.models) or any(
                not t.done() for t in self.loads.values()
            ):
                continue
            try:
                await self.neurons.release_memory(node.name)
            except ApiError as exc:
                log.warning("release-memory on %s failed: %s", node.name, exc)
                continue
            self.cycles[node.name] = 0
            self.metrics.defrags.labels(node.name).inc()
            done.append(node.name)
        return done
