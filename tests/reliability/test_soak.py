"""The soak's short form (the long one is in docs/reliability.md): 1,000 requests at
concurrency 64 through a real gateway across two echo neurons, a mixed workload (every dialect,
whole and streamed, streams cut by the client, bad inputs) with the registry down for a while
(a cold load meets it) and a neuron killed and restarted half way. Nothing may be lost, every
failure must be a retryable one, every 5xx a documented upstream one, every bad input a 4xx,
and the gateway's memory must not grow by 10% or more."""

from __future__ import annotations

import pytest

from cortex.testing.soak import run_soak


@pytest.mark.timeout(600)
def test_short_soak_loses_nothing() -> None:
    result = run_soak(requests=1000, concurrency=64, warmup=300)
    summary = result.to_json()
    assert result.lost == 0, summary
    assert result.failed_other == 0, summary
    assert result.undocumented_5xx == 0, summary
    answered = result.completed + result.cut_by_client + result.rejected + result.failed_retryable
    assert answered == 1000, summary
    assert result.rejected == result.kinds["bad"], summary  # every bad input got its 4xx
    cuts = result.kinds["cut_chat"] + result.kinds["cut_messages"]
    assert 0.9 * cuts <= result.cut_by_client <= cuts, summary  # (a cut may meet a 503 first)
    # Most requests succeed: only those for the model behind the dead registry, and those in
    # flight on the killed neuron, may fail.
    assert result.failed_retryable <= 100, summary
    assert result.rss_growth < 0.10, summary
