"""The ``lru`` and ``priority`` eviction strategies."""

from __future__ import annotations

from cortex.eviction import LruStrategy, PriorityStrategy, RegisterStrategy
from cortex.hookspecs import hookimpl


@hookimpl
def cortex_register_eviction_strategies(register: RegisterStrategy) -> None:
    register(LruStrategy())
    register(PriorityStrategy())
