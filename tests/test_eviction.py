"""The built-in eviction strategies and the rules every strategy shares."""

from __future__ import annotations

from cortex.eviction import EvictionCandidate, LruStrategy, PriorityStrategy

MB = 2**20


def candidates() -> list[EvictionCandidate]:
    return [
        EvictionCandidate("pinned-old", 500 * MB, 0.0, priority=0, pinned=True),
        EvictionCandidate("busy-old", 500 * MB, 1.0, priority=0, in_flight=2),
        EvictionCandidate("idle-old-important", 300 * MB, 2.0, priority=10),
        EvictionCandidate("idle-new", 300 * MB, 3.0, priority=1),
    ]


def test_fits_without_eviction() -> None:
    assert LruStrategy().plan(candidates(), 100 * MB, 200 * MB).victims == ()


def test_lru_picks_least_recent_evictable() -> None:
    plan = LruStrategy().plan(candidates(), 400 * MB, 200 * MB)
    assert plan.fits and plan.victims == ("idle-old-important",)


def test_priority_picks_lowest_priority_first() -> None:
    plan = PriorityStrategy().plan(candidates(), 400 * MB, 200 * MB)
    assert plan.victims == ("idle-new",)


def test_never_pinned_never_busy_and_no_partial_plan() -> None:
    for strategy in (LruStrategy(), PriorityStrategy()):
        plan = strategy.plan(candidates(), 1000 * MB, 200 * MB)
        assert not plan.fits
        assert plan.victims == ()
        assert "needs 1000 MiB" in (plan.reason or "")
        assert "pinned or busy" in (plan.reason or "")


def test_takes_several_victims_in_order() -> None:
    plan = LruStrategy().plan(candidates(), 700 * MB, 200 * MB)
    assert plan.victims == ("idle-old-important", "idle-new")
