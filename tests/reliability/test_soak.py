"""The soak's short form (the long one is in docs/reliability.md): 1,000 requests at
concurrency 64 through a real gateway across two echo neurons, one killed and restarted half
way. Nothing may be lost, every failure must be a retryable one, and the gateway's memory must
not grow by 10% or more."""

from __future__ import annotations

import pytest

from cortex.testing.soak import run_soak


@pytest.mark.timeout(600)
def test_short_soak_loses_nothing() -> None:
    result = run_soak(requests=1000, concurrency=64, warmup=300)
    summary = result.to_json()
    assert result.lost == 0, summary
    assert result.failed_other == 0, summary
    assert result.completed + result.failed_retryable == 1000, summary
    # Most requests succeed: only those in flight on the killed neuron may fail.
    assert result.completed >= 900, summary
    assert result.rss_growth < 0.10, summary
