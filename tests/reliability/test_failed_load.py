"""A load that fails (corrupt file, not enough memory, registry down): every waiter gets the
same clear error, ``/v1/models`` says ``failed`` and why, and the next request does not load
again until a backoff has passed (then it does, and the backoff doubles)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx
import pytest

from cortex.config import ModelProfile
from cortex.testing.registry import publish_repo
from cortex.testing.servers import free_port

HELLO = [{"role": "user", "content": "hello"}]


def attempts(gw) -> float:
    return sum(gw.metric("cortex_cold_loads_total", node="n1", outcome=o) for o in ("ok", "failed"))


async def many(url: str, model: str, count: int) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, dict]:
            body = {"model": model, "messages": HELLO}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                # Every answer to a failed load says when to come back, the first ones too
                # (issue 22: the first 422 load_failed had no Retry-After, later ones did).
                assert resp.headers.get("Retry-After"), (resp.status, dict(resp.headers))
                return resp.status, await resp.json()

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("cause", ["corrupt file", "not enough memory", "registry down"])
def test_failed_load_is_shared_reported_and_backed_off(parts, cause: str) -> None:
    model, memory_mb, overrides = "acme/broken", 10, {}
    if cause == "corrupt file":
        publish_repo(parts.registry.root, model, {"echo.json": b'{"reply": "x", "bogus": 1}'})
    elif cause == "not enough memory":
        model, memory_mb = "acme/echo", 4096
    else:
        model = "acme/never-cached"
        dead = f"http://127.0.0.1:{free_port()}"
        overrides = {
            "sources": {
                "huggingface": {
                    "endpoint": dead,
                    "auth_env": "CORTEX_TEST_NO_TOKEN",
                    "cache_dir": str(parts.tmp / "empty-cache"),
                }
            }
        }
    neuron = parts.neuron("n1", **overrides)
    gw = parts.gateway(
        {"n1": neuron.url}, models=[ModelProfile(id=model, memory_mb=memory_mb)], retry_after=2
    )
    canonical = f"huggingface:{model}"

    # Five requests wait on one load; all get the same error.
    answers = asyncio.run(many(gw.url, model, 5))
    assert len({json.dumps(a, sort_keys=True) for a in answers}) == 1, answers
    status, body = answers[0]
    assert 400 <= status < 600 and status != 500, answers[0]
    reason = body["error"]["message"]
    assert reason and body["error"]["code"]
    assert attempts(gw) <= 1  # one load for all five (placement may refuse before any)

    # /v1/models says failed and why.
    entry = {e["id"]: e for e in httpx.get(f"{gw.url}/v1/models").json()["data"]}[canonical]
    assert entry["state"] == "failed", entry
    assert entry["error"]["message"] == reason and entry["error"]["attempts"] == 1

    # Within the backoff: the same error at once, with Retry-After, and no new load.
    before = attempts(gw)
    started = time.monotonic()
    again = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": model, "messages": HELLO})
    assert time.monotonic() - started < 1.0
    assert (again.status_code, again.json()["error"]["message"]) == (status, reason)
    assert 1 <= int(again.headers["retry-after"]) <= 2
    assert attempts(gw) == before

    # After the backoff the next request tries again; a second failure doubles the backoff.
    time.sleep(2.1)
    retried = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": model, "messages": HELLO})
    assert retried.json()["error"]["message"] == reason
    assert gw.gateway.scheduler.failures[canonical].attempts == 2
    assert gw.gateway.scheduler.failures[canonical].backoff == 4
    if before:
        assert attempts(gw) == before + 1
