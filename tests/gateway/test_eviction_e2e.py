"""Eviction, keep_alive and defrag against real neurons (models pinned to n1 by profile)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from cortex.config import Duration, ModelProfile

HELLO = [{"role": "user", "content": "hello"}]


def on_n1(name: str, mb: int = 300, **profile: object) -> ModelProfile:
    return ModelProfile(id=name, memory_mb=mb, nodes=["n1"], **profile)


def ask(gw, model: str) -> str:
    raw = gw.client().chat.completions.with_raw_response.create(
        model=model, messages=HELLO, max_tokens=4
    )
    return raw.headers["x-cortex-node"]


def loaded(fleet, node: str = "n1") -> set[str]:
    return {m.split(":", 1)[1] for m in fleet.neuron_models(node)}


def publish(fleet, *names: str, mb: int = 300, **spec: object) -> None:
    for name in names:
        fleet.publish_echo(name, reply="fine", memory_mb=mb, **spec)


def test_lru_evicts_the_least_recently_used_and_spares_pinned(fleet) -> None:
    publish(fleet, "ev/pinned", "ev/a", "ev/b", "ev/c")
    gw = fleet.gateway(
        models=[on_n1("ev/pinned", pinned=True), on_n1("ev/a"), on_n1("ev/b"), on_n1("ev/c")]
    )
    for name in ("ev/pinned", "ev/a", "ev/b"):
        assert ask(gw, name) == "n1"
    assert loaded(fleet) == {"ev/pinned", "ev/a", "ev/b"}  # 900 of 1000 MB
    ask(gw, "ev/b")
    assert ask(gw, "ev/c") == "n1"
    assert loaded(fleet) == {"ev/pinned", "ev/b", "ev/c"}
    assert gw.metric("cortex_evictions_total", node="n1", reason="memory") == 1
    # Every later load must evict again, never the pinned model.
    ask(gw, "ev/a")
    assert "ev/pinned" in loaded(fleet) and "ev/b" not in loaded(fleet)


def test_priority_evicts_the_lowest_priority_first(fleet) -> None:
    publish(fleet, "pr/high", "pr/low", "pr/filler", "pr/new")
    gw = fleet.gateway(
        models=[
            on_n1("pr/high", priority=5),
            on_n1("pr/low", priority=1),
            on_n1("pr/filler", priority=9),
            on_n1("pr/new"),
        ],
        strategy="priority",
    )
    for name in ("pr/high", "pr/low", "pr/filler", "pr/low"):
        ask(gw, name)  # 900 of 1000 MB; pr/high is now the least recently used
    ask(gw, "pr/new")
    assert loaded(fleet) == {"pr/high", "pr/filler", "pr/new"}  # lru would have taken pr/high


def test_a_model_with_a_stream_in_flight_is_never_evicted(fleet) -> None:
    fleet.publish_echo(
        "fl/streaming", reply=" ".join(["x"] * 400), tokens_per_second=20, memory_mb=300
    )
    fleet.publish_echo("fl/new", reply=" ".join(["z"] * 400), tokens_per_second=20, memory_mb=300)
    publish(fleet, "fl/pinned", "fl/idle", "fl/newer")
    gw = fleet.gateway(
        models=[
            on_n1("fl/pinned", pinned=True),
            on_n1("fl/streaming"),
            on_n1("fl/idle"),
            on_n1("fl/new"),
            on_n1("fl/newer"),
        ]
    )
    ask(gw, "fl/pinned")
    ask(gw, "fl/idle")
    stream = gw.client().chat.completions.create(model="fl/streaming", messages=HELLO, stream=True)
    chunks = iter(stream)
    next(chunks)
    ask(gw, "fl/idle")  # fl/streaming is now the least recently *started*, but it is busy
    assert ask(gw, "fl/new") == "n1"
    assert loaded(fleet) == {"fl/pinned", "fl/streaming", "fl/new"}
    # Now everything evictable is busy: a fourth model cannot be placed, retry later.
    second = gw.client().chat.completions.create(model="fl/new", messages=HELLO, stream=True)
    next(iter(second))
    with pytest.raises(openai.APIStatusError) as info:
        gw.client().chat.completions.create(model="fl/newer", messages=HELLO)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "insufficient_memory"
    assert info.value.response.headers["retry-after"]
    assert "fl/streaming" in loaded(fleet)
    stream.close()
    second.close()


def test_keep_alive_unloads_idle_models_but_never_pinned_and_defrags(fleet) -> None:
    publish(fleet, "ka/short", "ka/pinned", mb=50)
    gw = fleet.gateway(
        models=[
            on_n1("ka/short", mb=50, keep_alive=Duration(2.0)),
            on_n1("ka/pinned", mb=50, keep_alive=Duration(0.1), pinned=True),
        ],
        defrag_after_cycles=2,
    )
    ask(gw, "ka/pinned")
    ask(gw, "ka/short")
    assert loaded(fleet) == {"ka/short", "ka/pinned"}  # used just now: 2 s to go
    gw.wait_for(lambda: "ka/short" not in loaded(fleet), timeout=10)
    assert gw.metric("cortex_evictions_total", node="n1", reason="keep_alive") == 1
    assert "ka/pinned" in loaded(fleet)
    # Two loads and one unload: past defrag_after_cycles=2, and n1 is idle.
    gw.wait_for(lambda: gw.metric("cortex_defrags_total", node="n1") == 1, timeout=10)
    assert "ka/pinned" in loaded(fleet)


def test_busy_model_outlives_keep_alive_until_its_stream_ends(fleet) -> None:
    fleet.publish_echo("ka/stream", reply=" ".join(["y"] * 40), tokens_per_second=20, memory_mb=50)
    gw = fleet.gateway(models=[on_n1("ka/stream", mb=50, keep_alive=Duration(0.5))])
    done = threading.Event()

    def consume() -> None:
        for _ in gw.client().chat.completions.create(
            model="ka/stream", messages=HELLO, stream=True
        ):
            pass
        done.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert not done.wait(1.2)  # 2 s of stream; keep_alive (0.5 s) has passed meanwhile
    assert "ka/stream" in loaded(fleet)
    reader.join(10)
    gw.wait_for(lambda: "ka/stream" not in loaded(fleet), timeout=10)


def test_model_larger_than_any_device_is_explained(fleet) -> None:
    fleet.publish_echo("big/model", memory_mb=5000)
    gw = fleet.gateway(models=[ModelProfile(id="big/model", memory_mb=5000)])
    answer = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "big/model", "messages": HELLO},
        timeout=10,
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "model_too_large"
    assert "5000 MiB" in error["message"] and "1000 MiB" in error["message"]
