"""Admission control: a bounded number of requests per model in flight, a bounded queue behind
them, and waiters that give their place back the moment their client goes away.

Why: a retrying tool or a runaway agent can send far more than a fleet can serve. Without a
bound every excess request holds a socket, memory and a neuron queue slot until it times out,
and the requests behind it time out too. With one, excess requests get a fast 429 with
``Retry-After`` (the queue is full) or 503 (they waited ``queue_timeout``), and what is admitted
is served at full speed. A waiter whose client disconnected is removed at once, so cancelled
requests never hold capacity (tests/reliability/test_overload.py cancels 100 of them).

The gates belong to the scheduler (:mod:`cortex.gateway.scheduler`), which also enforces the
per-node bound (a node at its limit is not picked; when every replica is at its limit the
request gets 503 + Retry-After).

A neuron has a bound of its own (``max_queue`` per device: 503 ``queue_full``). A request it
refuses that way is *held* by the gateway (:func:`cortex.gateway.proxy.open_upstream`) and sent
again as the neuron frees room, within the same ``queue_timeout`` budget, holding its admission
slot meanwhile: the gateway's documented bounds (``max_in_flight_per_model`` held or running,
``model_queue_size`` waiting behind them, ``queue_timeout`` in all) decide when a client is
refused, not the first neuron queue that fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from cortex.wire.errors import ApiError

Receive = Callable[[], Awaitable[dict[str, Any]]]

# The ASGI ``receive`` of the request being handled (set by the generation routes' endpoint,
# :mod:`cortex.gateway.fast_path`): after the body was read, it returns ``http.disconnect`` when
# the client goes away.
CURRENT_RECEIVE: contextvars.ContextVar[Receive | None] = contextvars.ContextVar(
    "cortex_current_receive", default=None
)
# Until when the request being handled may still wait for capacity (monotonic time; set by
# :meth:`Admission.budget_from`). One budget, ``queue_timeout``, for the gateway's queue and for a
# neuron that answers ``queue_full`` (:mod:`cortex.gateway.proxy` holds the request and sends it
# again until then). Requests that skip the gate (count_tokens) get the same budget, from when
# they were admitted without waiting. None: not through the scheduler, never held.
HOLD_UNTIL: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "cortex_hold_until", default=None
)


class ClientGone(ApiError):
    """The client disconnected while waiting in the queue (nobody reads this answer)."""


class Slot:
    """One admitted request; :meth:`release` is idempotent (several paths may end a request)."""

    __slots__ = ("_gate", "key")

    def __init__(self, gate: Gate | None, key: str | None = None) -> None:
        self._gate = gate
        self.key = key

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(self.key)


class Waiter:
    """A request in a gate's queue: the future its slot is handed through, and its key."""

    __slots__ = ("future", "key")

    def __init__(self, future: asyncio.Future[None], key: str | None) -> None:
        self.future = future
        self.key = key


class Gate:
    """At most ``limit`` holders; at most ``queue_size`` waiters; a freed slot is handed straight
    to a waiter still waiting.

    Fair share between keys: a freed slot goes to the waiter whose key holds the fewest slots
    (the oldest such waiter first), and a full queue makes room for a key with fewer waiters by
    refusing the newest waiter of the key with the most. So one key sending far more than the
    model can serve (a runaway agent) fills what nobody else wants, but another key's request
    waits for one slot to free, not for the greedy key's whole backlog. Requests without a key
    (auth off) are one group: first come, first served, as before."""

    def __init__(self, name: str, limit: int, queue_size: int) -> None:
        self.name = name
        self.limit = limit
        self.queue_size = queue_size
        self.active = 0
        self.waiters: deque[Waiter] = deque()
        self.held: dict[str | None, int] = {}  # slots held per key

    @property
    def waiting(self) -> int:
        return sum(1 for w in self.waiters if not w.future.done())

    def set_limit(self, limit: int) -> None:
        """A new ``limit`` (the replicas' capacity changed): a larger one hands free slots to
        waiters at once; a smaller one takes effect as holders leave."""
        self.limit = limit
        while self.active < self.limit:
            nxt = self._next()
            if nxt is None:
                return
            self.active += 1
            self._hold(nxt.key)
            nxt.future.set_result(None)

    def _hold(self, key: str | None) -> None:
        self.held[key] = self.held.get(key, 0) + 1

    async def enter(
        self, timeout: float | None, retry_after: float, key: str | None = None
    ) -> Slot:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            self._hold(key)
            return Slot(self, key)
        if self.waiting >= self.queue_size and not self._make_room(key, retry_after):
            raise ApiError(
                429,
                "model_queue_full",
                f"model {self.name!r} has {self.active} requests running and "
                f"{self.waiting} waiting (the limit); retry after a moment",
                retry_after=retry_after,
            )
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(granted, key)
        self.waiters.append(waiter)
        try:
            await self._wait(granted, timeout, retry_after)
        except BaseException:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.release(key)  # granted while leaving: hand the slot on
            elif not granted.done():
                granted.cancel()
            self._forget(waiter)
            raise
        return Slot(self, key)

    def _make_room(self, key: str | None, retry_after: float) -> bool:
        """The queue is full: refuse the newest waiter of the key with the most waiters when
        ``key`` has fewer (fair share). True when a place was freed."""
        counts: dict[str | None, int] = {}
        for w in self.waiters:
            if not w.future.done():
                counts[w.key] = counts.get(w.key, 0) + 1
        if not counts:
            return False
        heaviest = max(counts, key=lambda k: counts[k])
        if counts.get(key, 0) + 1 >= counts[heaviest]:
            return False
        for w in reversed(self.waiters):
            if w.key == heaviest and not w.future.done():
                w.future.set_exception(
                    ApiError(
                        429,
                        "model_queue_full",
                        f"model {self.name!r} is at its limit and its queue is full; this "
                        "request gave its place to another key's (fair share); retry after a "
                        "moment",
                        retry_after=retry_after,
                    )
                )
                return True
        return False

    async def _wait(
        self, granted: asyncio.Future[None], timeout: float | None, retry_after: float
    ) -> None:
        receive = CURRENT_RECEIVE.get()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not granted.done():
            watch = asyncio.ensure_future(receive()) if receive is not None else None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            waiting_on: set[asyncio.Future[Any]] = {granted} | ({watch} if watch else set())
            try:
                await asyncio.wait(waiting_on, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if watch is not None and not watch.done():
                    watch.cancel()
            if granted.done():
                break
            if watch is not None and watch.done() and not watch.cancelled():
                if watch.result().get("type") == "http.disconnect":
                    raise ClientGone(499, "client_closed", "the client went away while queued")
                continue  # not a disconnect (an empty body frame): keep watching
            if deadline is not None and time.monotonic() >= deadline:
                raise ApiError(
                    503,
                    "queue_timeout",
                    f"model {self.name!r} stayed at its limit for {timeout:g}s; try again",
                    retry_after=retry_after,
                )
        granted.result()  # a waiter refused to make room (fair share) raises here

    def _forget(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):  # already handed a slot and popped
            self.waiters.remove(waiter)

    def release(self, key: str | None = None) -> None:
        held = self.held.get(key, 0) - 1
        if held > 0:
            self.held[key] = held
        else:
            self.held.pop(key, None)
        nxt = self._next() if self.active <= self.limit else None
        if nxt is not None:
            self._hold(nxt.key)
            nxt.future.set_result(None)  # the slot passes on; ``active`` is unchanged
            return
        self.active -= 1

    def _next(self) -> Waiter | None:
        """The waiter a freed slot goes to: the oldest of the key holding the fewest slots."""
        while self.waiters and self.waiters[0].future.done():
            self.waiters.popleft()
        if not self.waiters:
            return None
        best: Waiter | None = None
        best_held = 0
        keys_seen: set[str | None] = set()
        for w in self.waiters:
            if w.future.done() or w.key in keys_seen:
                continue
            keys_seen.add(w.key)
            held = self.held.get(w.key, 0)
            if best is None or held < best_held:
                best, best_held = w, held
                if held == 0:
                    break
        if best is not None:
            self.waiters.remove(best)
        return best


class Admission:
    """One :class:`Gate` per model (created on first use).

    With keys (every request names one: auth is on), a model's gate holds at most what its
    ready replicas run at once (``capacity``: the sum of their ``max_batch``), not only
    ``per_model``: otherwise a greedy key's requests all pass the gate and wait first come,
    first served in the neurons' queues, where fair share cannot reach them (measured: a polite
    key's first token after 13.3 s behind 100 greedy streams on one 32-row replica, 2.8 s with
    the gate at 32). Without keys nothing is shared out, and requests wait on the neurons as
    before. While no replica is ready (a cold load) the gate holds ``per_model``."""

    def __init__(
        self,
        per_model: int,
        queue_size: int,
        queue_timeout: float | None,
        retry_after: float,
        capacity: Callable[[str], int] | None = None,
    ) -> None:
        self.per_model = per_model
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.capacity = capacity
        self.gates: dict[str, Gate] = {}

    def gate(self, model: str) -> Gate:
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = Gate(model, self.per_model, self.queue_size)
        return gate

    async def enter(self, model: str, key: str | None = None) -> Slot:
        started = time.monotonic()
        gate = self.gate(model)
        if key is not None and self.capacity is not None:
            running_at_once = self.capacity(model)
            gate.set_limit(min(self.per_model, running_at_once or self.per_model))
        slot = await gate.enter(self.queue_timeout, self.retry_after, key)
        self.budget_from(started)
        return slot

    def budget_from(self, started: float) -> None:
        """Give the request being handled its ``queue_timeout`` budget, counted from
        ``started``, for a full neuron to take it (HOLD_UNTIL). :meth:`enter` does it for a
        request that waited in the gate; the scheduler does it for one that skips the gate
        (count_tokens), which a full neuron refuses all the same and which is held likewise."""
        timeout = self.queue_timeout
        HOLD_UNTIL.set(math.inf if timeout is None else started + timeout)


async def pause_unless_client_left(wake: asyncio.Event, seconds: float) -> None:
    """Sleep up to ``seconds``, less when ``wake`` is set; :class:`ClientGone` when the client of
    the request being handled disconnects meanwhile (it is watched as in the queue)."""
    receive = CURRENT_RECEIVE.get()
    woken = asyncio.ensure_future(wake.wait())
    watch = asyncio.ensure_future(receive()) if receive is not None else None
    pending: set[asyncio.Future[Any]] = {woken} | ({watch} if watch else set())
    try:
        done, _ = await asyncio.wait(pending, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in pending:
            if not future.done():
                future.cancel()
    left = watch is not None and watch in done and not watch.cancelled()
    if left and watch is not None and watch.result().get("type") == "http.disconnect":
        raise ClientGone(499, "client_closed", "the client went away while held")
