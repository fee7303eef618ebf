"""Eviction: which idle models to unload on a node to make room for a new one.

Strategies are plugins (``cortex_register_eviction_strategies``). Every strategy sees the same
facts about one node's loaded models and answers with a complete plan or a reason it cannot fit:
a partial plan would unload models and still fail the load, the worst of both.

Core ships ``lru`` and ``priority``; both share :func:`plan_in_order`, which enforces the rules no
strategy may break: never a pinned model, never one with requests in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen
class EvictionCandidate:
    """One loaded model on the node, as the gateway sees it."""

    model_id: str
    memory_bytes: int
    last_used: float
    priority: int = 0
    pinned: bool = False
    in_flight: int = 0

    @property
    def evictable(self) -> bool:
        return not self.pinned and self.in_flight == 0


@attrs.frozen
class EvictionPlan:
    """Either ``victims`` (unload these, in order, and the load fits) or ``reason`` (it cannot)."""

    victims: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def fits(self) -> bool:
        return self.reason is None


@runtime_checkable
class EvictionStrategy(Protocol):
    """What ``cortex_register_eviction_strategies`` registers."""

    @property
    def name(self) -> str:
        """What ``[eviction] strategy`` names."""
        ...

    def plan(
        self, candidates: list[EvictionCandidate], bytes_needed: int, bytes_free: int
    ) -> EvictionPlan:
        """Pick victims so that ``bytes_free`` plus their memory covers ``bytes_needed``."""
        ...


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def plan_in_order(
    ordered: Iterable[EvictionCandidate], bytes_needed: int, bytes_free: int
) -> EvictionPlan:
    """Take evictable candidates in the given order until the load fits; else say why not."""
    ordered = list(ordered)
    if bytes_free >= bytes_needed:
        return EvictionPlan()
    victims: list[str] = []
    freed = bytes_free
    for candidate in ordered:
        if not candidate.evictable:
            continue
        victims.append(candidate.model_id)
        freed += candidate.memory_bytes
        if freed >= bytes_needed:
            return EvictionPlan(victims=tuple(victims))
    held = sum(c.memory_bytes for c in ordered if not c.evictable)
    return EvictionPlan(
        reason=(
            f"needs {_mib(bytes_needed)} but only {_mib(freed)} can be freed "
            f"({_mib(bytes_free)} free, {_mib(held)} held by pinned or busy models)"
        )
    )


@attrs.frozen
class LruStrategy:
    """Least recently used first."""

    name: str = "lru"

    def plan(
        self, candidates: list[EvictionCandidate], bytes_needed: int, bytes_free: int
    ) -> EvictionPlan:
        return plan_in_order(
            sorted(candidates, key=lambda c: c.last_used), bytes_needed, bytes_free
        )


@attrs.frozen
class PriorityStrategy:
    """Lowest ``priority`` first, least recently used among equals."""

    name: str = "priority"

    def plan(
        self, candidates: list[EvictionCandidate], bytes_needed: int, bytes_free: int
    ) -> EvictionPlan:
        ordered = sorted(candidates, key=lambda c: (c.priority, c.last_used))
        return plan_in_order(ordered, bytes_needed, bytes_free)


RegisterStrategy = Callable[[EvictionStrategy], None]
