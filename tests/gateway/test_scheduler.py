"""The scheduler's policy against a fake fleet: no sockets, no servers.

:class:`FakeNeurons` is the scheduler's side-effect interface (``cortex.gateway.scheduler
.Neurons``) kept in memory: loads and unloads change its view, every action is recorded, and a
load can be held open (an event) or made to fail, so cold loads, joining, eviction, backoff,
admission, node caps, leases and rerouting are all tested on plain data.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any

import attrs
import pytest

from cortex.config import (
    CortexConfig,
    Duration,
    EvictionSection,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
)
from cortex.eviction import LruStrategy
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.nodes import LOADING, READY, NodeState
from cortex.gateway.router import Resolved, resolve
from cortex.gateway.scheduler import MODEL_UNLOADED, Scheduler
from cortex.testing.fleet import MIB, model, node
from cortex.testing.metrics import sum_samples
from cortex.wire.errors import ApiError

HF = "huggingface"
M = "huggingface:acme/m"


class FakeNeurons:
    """The fleet as the scheduler sees it, in memory (see the module docstring)."""

    def __init__(self, *nodes: NodeState) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.actions: list[tuple[str, ...]] = []
        self.hold: asyncio.Event | None = None  # loads wait for it when set
        self.fail_loads: ApiError | None = None
        self.estimate_bytes = 64 * MIB

    def up_nodes(self) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.up]

    async def refresh(self, name: str) -> NodeState:
        self.actions.append(("refresh", name))
        return self.nodes[name]

    def refresh_soon(self, name: str) -> None:
        self.actions.append(("refresh_soon", name))

    async def refresh_within(self, names: Iterable[str], seconds: float) -> None:
        self.actions.append(("refresh_within", *sorted(names)))

    async def estimate(self, name: str, payload: dict[str, Any]) -> int:
        self.actions.append(("estimate", name, str(payload["model_id"])))
        return self.estimate_bytes

    async def load(self, name: str, payload: dict[str, Any]) -> None:
        model_id, device = str(payload["model_id"]), str(payload.get("device", "cpu"))
        self.actions.append(("load", name, model_id))
        target = self.nodes[name]
        target.models = (*target.models, model(model_id, state=LOADING, device=device))
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_loads is not None:
            target.models = tuple(m for m in target.models if m.id != model_id)
            raise self.fail_loads
        target.models = tuple(
            attrs.evolve(m, state=READY, memory_bytes=100 * MIB) if m.id == model_id else m
            for m in target.models
        )

    async def unload(self, name: str, model_id: str) -> None:
        self.actions.append(("unload", name, model_id))
        target = self.nodes[name]
        target.models = tuple(m for m in target.models if m.id != model_id)

    async def release_memory(self, name: str) -> None:
        self.actions.append(("release_memory", name))

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [a for a in self.actions if a[0] == kind]


def config(defrag: int = 0, **gateway: Any) -> CortexConfig:
    return CortexConfig(
        gateway=GatewaySection(**{"retry_after": 2, **gateway}),
        eviction=EvictionSection(defrag_after_cycles=defrag),
        neurons=[NeuronRef("unused", "http://unused.invalid")],
    )


def scheduler(
    neurons: FakeNeurons, models: ModelsConfig | None = None, **gateway: Any
) -> Scheduler:
    return Scheduler(
        config(**gateway),
        models or ModelsConfig(),
        LruStrategy(),
        neurons,
        GatewayMetrics(),
        lambda: HF,
    )


def resolved(name: str, models: ModelsConfig | None = None) -> Resolved:
    return resolve(name, models or ModelsConfig(), HF)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the policy needs no sockets: any attempt to connect or listen fails."""

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the scheduler's tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "bind", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- leases -----------------------------------------------------------------------------------


def test_a_lease_counts_the_request_until_it_is_released_once() -> None:
    fleet = FakeNeurons(node("a", model("acme/m")))
    s = scheduler(fleet)

    async def go() -> None:
        lease = await s.acquire(resolved("acme/m"))
        assert lease.node.name == "a"
        assert s.usage.busy("a", M) == 1
        assert s.admission.gate(M).active == 1
        lease.release()
        lease.release()  # idempotent: several paths may end a request
        assert s.usage.busy("a", M) == 0
        assert s.admission.gate(M).active == 0

    run(go())
    assert fleet.actions == []  # a ready model: no side effect at all


def test_count_tokens_leases_skip_admission() -> None:
    s = scheduler(FakeNeurons(node("a", model("acme/m"))), max_in_flight_per_model=1)

    async def go() -> None:
        held = await s.acquire(resolved("acme/m"))
        unqueued = await s.acquire(resolved("acme/m"), queued=False)  # not behind the gate
        assert s.usage.busy("a", M) == 2 and s.admission.gate(M).active == 1
        unqueued.release()
        held.release()

    run(go())


def test_the_least_busy_replica_and_the_node_cap() -> None:
    fleet = FakeNeurons(node("a", model("acme/m")), node("b", model("acme/m")))
    s = scheduler(fleet, max_in_flight_per_node=1)

    async def go() -> None:
        first = await s.acquire(resolved("acme/m"))
        second = await s.acquire(resolved("acme/m"))
        assert {first.node.name, second.node.name} == {"a", "b"}
        with pytest.raises(ApiError) as full:
            await s.acquire(resolved("acme/m"))
        assert (full.value.status, full.value.code) == (503, "nodes_at_capacity")
        assert full.value.retry_after == 2
        assert s.admission.gate(M).active == 2  # the refused one gave its slot back
        first.release()
        third = await s.acquire(resolved("acme/m"))
        assert third.node.name == first.node.name
        second.release()
        third.release()

    run(go())


def test_the_model_queue_refuses_beyond_its_size() -> None:
    s = scheduler(
        FakeNeurons(node("a", model("acme/m"))),
        max_in_flight_per_model=1,
        model_queue_size=1,
        queue_timeout=Duration(5),
    )

    async def go() -> None:
        held = await s.acquire(resolved("acme/m"))
        waiter = asyncio.ensure_future(s.acquire(resolved("acme/m")))
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as refused:
            await s.acquire(resolved("acme/m"))
        assert (refused.value.status, refused.value.code) == (429, "model_queue_full")
        held.release()
        (await waiter).release()

    run(go())


def test_unknown_and_down_models_are_refused_with_reasons() -> None:
    fleet = FakeNeurons(node("a", model("acme/gone")), node("b", up=False))
    fleet.nodes["b"].models = (model("acme/m"),)
    s = scheduler(fleet)
    with pytest.raises(ApiError) as unknown:
        run(s.acquire(resolved("acme/nope")))
    assert unknown.value.code == "model_not_found"
    with pytest.raises(ApiError) as down:
        run(s.acquire(resolved("acme/m")))
    assert (down.value.status, down.value.code) == (503, "service_unavailable")
    assert s.admission.gate(M).active == 0


# ---- cold loads -------------------------------------------------------------------------------


def test_a_burst_for_a_cold_model_makes_one_load() -> None:
    fleet = FakeNeurons(node("a"), node("b", cpu_mb=2048))
    profiles = ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=100)])
    s = scheduler(fleet, profiles)

    async def go() -> list[str]:
        fleet.hold = asyncio.Event()
        burst = [asyncio.ensure_future(s.acquire(resolved("acme/m", profiles))) for _ in range(8)]
        await asyncio.sleep(0.01)
        assert s.loads_in_progress() == [M]
        fleet.hold.set()
        leases = await asyncio.gather(*burst)
        for lease in leases:
            lease.release()
        return [lease.node.name for lease in leases]

    placed = run(go())
    assert fleet.of("load") == [("load", "b", M)]  # one load, on the node with the most room
    assert set(placed) == {"b"}
    # the placement was made on a view polled just before (two gateways decide alike)
    assert ("refresh_within", "a", "b") in fleet.actions
    assert sum_samples(s.metrics.registry, "cortex_cold_loads_total", outcome="ok") == 1


def test_a_load_another_gateway_started_is_joined_not_counted_as_ours() -> None:
    loading = model("acme/m", state=LOADING)
    fleet = FakeNeurons(node("a"), node("b", loading))
    s = scheduler(fleet, ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=100)]))
    profiles = s.models

    async def go() -> None:
        lease = await s.acquire(resolved("acme/m", profiles))
        assert lease.node.name == "b"
        lease.release()

    run(go())
    assert fleet.of("load") == [("load", "b", M)]  # the neuron coalesces it with the running one
    registry = s.metrics.registry
    assert sum_samples(registry, "cortex_cold_loads_total", outcome="joined") == 1
    assert sum_samples(registry, "cortex_cold_loads_total", outcome="ok") == 0
    assert s.cycles["b"] == 0  # not a load/unload cycle of ours


def test_the_estimate_is_asked_once_and_cached() -> None:
    fleet = FakeNeurons(node("a"))
    s = scheduler(fleet)
    run(s.ensure_loaded(resolved("acme/m", ModelsConfig(models=[ModelProfile(id="acme/m")]))))
    fleet.nodes["a"].models = ()
    run(s.ensure_loaded(resolved("acme/m", ModelsConfig(models=[ModelProfile(id="acme/m")]))))
    assert fleet.of("estimate") == [("estimate", "a", M)]
    assert s.estimates[M] == 64 * MIB


def test_a_failed_load_backs_off_and_answers_the_same() -> None:
    fleet = FakeNeurons(node("a"))
    fleet.fail_loads = ApiError(422, "load_failed", "loading failed at /srv/models/x: boom")
    profiles = ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=10)])
    s = scheduler(fleet, profiles)
    with pytest.raises(ApiError) as first:
        run(s.acquire(resolved("acme/m", profiles)))
    assert first.value.code == "load_failed" and "[path]" in first.value.message  # redacted
    with pytest.raises(ApiError) as again:
        run(s.acquire(resolved("acme/m", profiles)))
    assert again.value.code == "load_failed" and again.value.retry_after is not None
    assert len(fleet.of("load")) == 1  # the backoff holds the second request back
    assert s.failures[M].attempts == 1
    assert s.admission.gate(M).active == 0


def test_eviction_unloads_the_idle_model_then_loads() -> None:
    old = model("acme/old", mb=900, last_used=1.0)
    fleet = FakeNeurons(node("a", old, cpu_mb=1000))
    profiles = ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=500)])
    s = scheduler(fleet, profiles)
    run(s.ensure_loaded(resolved("acme/m", profiles)))
    assert [a[0] for a in fleet.actions if a[0] in ("unload", "load")] == ["unload", "load"]
    assert fleet.of("unload") == [("unload", "a", "huggingface:acme/old")]
    registry = s.metrics.registry
    assert sum_samples(registry, "cortex_evictions_total", reason="memory") == 1
    assert [e["kind"] for e in s.events.latest()] == ["load", "evict"]


def test_a_busy_model_is_never_evicted() -> None:
    busy = model("acme/old", mb=900)
    fleet = FakeNeurons(node("a", busy, cpu_mb=1000))
    profiles = ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=500)])
    s = scheduler(fleet, profiles)

    async def go() -> None:
        lease = await s.acquire(resolved("acme/old"))
        with pytest.raises(ApiError) as full:
            await s.acquire(resolved("acme/m", profiles))
        assert (full.value.status, full.value.code) == (503, "insufficient_memory")
        lease.release()

    run(go())
    assert fleet.of("unload") == []


# ---- rerouting --------------------------------------------------------------------------------


@attrs.define
class Gone:
    code: str
    never_connected: bool = True


def test_an_unreachable_node_sends_the_request_to_another_replica() -> None:
    fleet = FakeNeurons(node("a", model("acme/m")), node("b", model("acme/m")))
    s = scheduler(fleet)

    async def go() -> None:
        lease = await s.acquire(resolved("acme/m"))
        first = lease.node.name
        assert await lease.reroute(Gone("upstream_connection_error"))
        assert lease.node.name != first
        assert s.usage.busy(first, M) == 0 and s.usage.busy(lease.node.name, M) == 1
        # the second one fails too: nowhere left to go
        assert not await lease.reroute(Gone("upstream_connection_error"))
        assert s.usage.busy(lease.node.name, M) == 0
        assert s.admission.gate(M).active == 1  # the slot stays until release
        lease.release()
        assert s.admission.gate(M).active == 0

    run(go())
    assert len(fleet.of("refresh_soon")) == 2


def test_a_model_unloaded_behind_our_back_is_loaded_again_not_failed() -> None:
    """Another gateway evicted it: the neuron says so; the view is refreshed (awaited) and
    routing runs again on it -- here a cold load, since no replica is left."""
    fleet = FakeNeurons(node("a", model("acme/m")))
    profiles = ModelsConfig(models=[ModelProfile(id="acme/m", memory_mb=100)])
    s = scheduler(fleet, profiles)

    async def go() -> None:
        lease = await s.acquire(resolved("acme/m", profiles))
        fleet.nodes["a"].models = ()  # the other gateway's eviction, as the neuron now says
        assert await lease.reroute(Gone(MODEL_UNLOADED))
        assert lease.node.name == "a" and lease.load_wait >= 0
        lease.release()

    run(go())
    assert fleet.of("refresh")[0] == ("refresh", "a")
    assert fleet.of("load") == [("load", "a", M)]


def test_an_error_after_bytes_were_relayed_is_not_rerouted() -> None:
    fleet = FakeNeurons(node("a", model("acme/m")), node("b", model("acme/m")))
    s = scheduler(fleet)

    async def go() -> None:
        lease = await s.acquire(resolved("acme/m"))
        assert not await lease.reroute(Gone("upstream_timeout", never_connected=False))
        lease.release()

    run(go())


# ---- maintenance ------------------------------------------------------------------------------


def test_keep_alive_unloads_idle_models_only() -> None:
    idle, pinned = model("acme/idle", last_used=1.0), model("acme/pinned", last_used=1.0)
    fleet = FakeNeurons(node("a", idle, pinned, model("acme/busy", last_used=1.0)))
    profiles = ModelsConfig(
        models=[
            ModelProfile(id="acme/idle", keep_alive=Duration(60)),
            ModelProfile(id="acme/pinned", keep_alive=Duration(60), pinned=True),
            ModelProfile(id="acme/busy", keep_alive=Duration(60)),
        ]
    )
    s = scheduler(fleet, profiles)

    async def go() -> list[tuple[str, str]]:
        lease = await s.acquire(resolved("acme/busy", profiles))
        try:
            return await s.unload_idle(now=10_000.0)
        finally:
            lease.release()

    assert run(go()) == [("a", "huggingface:acme/idle")]


def test_defrag_after_cycles_on_idle_nodes() -> None:
    fleet = FakeNeurons(node("a"))
    s = scheduler(fleet, defrag=2)
    s.cycles["a"] = 2
    assert run(s.defrag_idle_nodes()) == ["a"]
    assert fleet.of("release_memory") == [("release_memory", "a")]
    assert s.cycles["a"] == 0
