"""Routing decisions over plain fleet views: aliases, replicas, placement, eviction, errors."""

from __future__ import annotations

import pytest

from cortex.config import ModelProfile, ModelsConfig
from cortex.eviction import LruStrategy, PriorityStrategy
from cortex.gateway.nodes import Health
from cortex.gateway.router import least_busy, place, replicas, resolve
from cortex.gateway.usage import Usage
from cortex.testing.fleet import MIB, model, node
from cortex.wire.errors import ApiError

HF = "huggingface"


def models(*profiles: ModelProfile, **aliases: str) -> ModelsConfig:
    return ModelsConfig(models=list(profiles), aliases=aliases)


# ---- resolve -----------------------------------------------------------------------------------


def test_alias_resolves_one_level_and_bare_ids_take_the_default_source() -> None:
    config = models(ModelProfile(id="acme/a", memory_mb=10), fast="acme/a")
    r = resolve("fast", config, HF)
    assert (r.canonical, r.alias_of, r.profile.id) == (
        "huggingface:acme/a",
        "huggingface:acme/a",
        "acme/a",
    )
    assert resolve("huggingface:acme/a", config, HF).profile is not None
    assert resolve("acme/a", config, "helexa").canonical == "helexa:acme/a"
    assert resolve("acme/a", config, "helexa").profile is not None  # a bare profile: helexa too
    assert resolve("huggingface:acme/a", config, "helexa").profile is None
    with pytest.raises(ApiError) as info:
        resolve("gpt-4", config, HF)
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_alias_pointing_at_an_alias_is_not_followed() -> None:
    """One level: an alias whose target is itself an alias name resolves to that name."""
    config = models(**{"acme/a": "acme/b", "x": "acme/a"})
    assert resolve("x", config, HF).canonical == "huggingface:acme/a"
    with pytest.raises(ValueError, match="fast"):
        models(fast="acme/a", chain="fast")  # a target must be a model id


# ---- replicas ----------------------------------------------------------------------------------


def test_least_busy_replica_uses_live_counts_then_neuron_counts() -> None:
    a = node("a", model("acme/m", in_flight=0))
    b = node("b", model("acme/m", in_flight=5))
    c = node("c", model("acme/m"), up=False)
    usage = Usage()
    found = replicas([a, b, c], "huggingface:acme/m", usage)
    assert [n.name for n, _ in found] == ["a", "b"]
    assert least_busy(found, "huggingface:acme/m", usage)[0].name == "a"
    usage.begin("a", "huggingface:acme/m")
    assert least_busy(found, "huggingface:acme/m", usage)[0].name == "b"
    usage.evicting.add(("b", "huggingface:acme/m"))
    assert [n.name for n, _ in replicas([a, b], "huggingface:acme/m", usage)] == ["a"]


def test_least_busy_replica_weighs_live_counts_by_batch_capacity() -> None:
    """A replica that runs 32 generations at once has room where one that runs 4 is full; with
    the same room, fewer waiting on the neuron wins."""
    wide = node("wide", model("acme/m", max_batch=32))
    narrow = node("narrow", model("acme/m", max_batch=4))
    usage = Usage()
    found = replicas([wide, narrow], "huggingface:acme/m", usage)
    for _ in range(3):
        usage.begin("wide", "huggingface:acme/m")
    usage.begin("narrow", "huggingface:acme/m")
    assert least_busy(found, "huggingface:acme/m", usage)[0].name == "wide"  # 3/32 < 1/4
    queued = node("queued", model("acme/m", max_batch=8, waiting=2))
    idle = node("idle", model("acme/m", max_batch=8))
    found = replicas([queued, idle], "huggingface:acme/m", Usage())
    assert least_busy(found, "huggingface:acme/m", Usage())[0].name == "idle"


def test_loading_and_failed_entries_are_not_replicas() -> None:
    a = node("a", model("acme/m", state="loading"))
    b = node("b", model("acme/m", state="failed"))
    assert replicas([a, b], "huggingface:acme/m", Usage()) == []


# ---- placement ---------------------------------------------------------------------------------


def placed(config: ModelsConfig, name: str, nodes, usage=None, strategy=None, needed_mb=None):
    r = resolve(name, config, HF)
    needed = (needed_mb if needed_mb is not None else r.profile.memory_mb) * MIB
    return place(r, needed, nodes, usage or Usage(), strategy or LruStrategy(), config, HF)


def test_places_on_the_allowed_node_with_the_most_room() -> None:
    config = models(ModelProfile(id="acme/new", memory_mb=300, nodes=["b", "c"]))
    a = node("a", cpu_mb=4000)
    b = node("b", model("acme/x", mb=600), cpu_mb=1000)
    c = node("c", cpu_mb=800)
    p = placed(config, "acme/new", [a, b, c])
    assert (p.node, p.device, p.victims) == ("c", "cpu", ())


def test_gpu_nodes_place_on_accelerators_only() -> None:
    config = models(ModelProfile(id="acme/new", memory_mb=300))
    big_ram = node("a", gpus=(200, 400), cpu_mb=100_000)
    p = placed(config, "acme/new", [big_ram])
    assert (p.node, p.device) == ("a", "cuda:1")


def test_reservations_of_loads_in_progress_are_not_offered_twice() -> None:
    config = models(ModelProfile(id="acme/new", memory_mb=300))
    a, b = node("a", cpu_mb=1000), node("b", cpu_mb=900)
    usage = Usage()
    usage.reserve("a", "cpu", "huggingface:acme/other", 800)
    assert placed(config, "acme/new", [a, b], usage).node == "a"  # 800 bytes, not MiB
    usage.reserve("a", "cpu", "huggingface:acme/other", 800 * MIB)
    assert placed(config, "acme/new", [a, b], usage).node == "b"


def test_eviction_lru_picks_least_recently_used_and_never_pinned_or_busy() -> None:
    config = models(
        ModelProfile(id="acme/new", memory_mb=400),
        ModelProfile(id="acme/pinned", memory_mb=300, pinned=True),
    )
    n = node(
        "a",
        model("acme/pinned", mb=300, last_used=1),
        model("acme/old", mb=300, last_used=2),
        model("acme/busy", mb=300, last_used=3, in_flight=1),
        model("acme/recent", mb=300, last_used=4),
        cpu_mb=1200,
    )
    p = placed(config, "acme/new", [n])
    assert p.victims == ("huggingface:acme/old", "huggingface:acme/recent")
    assert p.freed_bytes == 600 * MIB
    usage = Usage()
    usage.begin("a", "huggingface:acme/old")  # a live stream the neuron has not reported yet
    with pytest.raises(ApiError) as info:
        placed(config, "acme/new", [n], usage)
    assert info.value.status == 503 and info.value.code == "insufficient_memory"
    assert info.value.retry_after


def test_eviction_priority_picks_lowest_priority_first() -> None:
    config = models(
        ModelProfile(id="acme/new", memory_mb=300),
        ModelProfile(id="acme/important", memory_mb=300, priority=10),
        ModelProfile(id="acme/cheap", memory_mb=300, priority=1),
    )
    n = node(
        "a",
        model("acme/important", mb=300, last_used=1),
        model("acme/cheap", mb=300, last_used=9),
        cpu_mb=600,
    )
    assert placed(config, "acme/new", [n], strategy=PriorityStrategy()).victims == (
        "huggingface:acme/cheap",
    )
    assert placed(config, "acme/new", [n], strategy=LruStrategy()).victims == (
        "huggingface:acme/important",
    )


def test_eviction_prefers_the_node_that_frees_least() -> None:
    config = models(ModelProfile(id="acme/new", memory_mb=300))
    a = node("a", model("acme/big", mb=900), cpu_mb=1000)
    b = node("b", model("acme/small", mb=250), model("acme/s2", mb=300), cpu_mb=600)
    p = placed(config, "acme/new", [a, b])
    assert (p.node, p.victims) == ("b", ("huggingface:acme/small",))


def test_too_large_for_any_device_says_needed_and_largest() -> None:
    config = models(ModelProfile(id="acme/huge", memory_mb=5000))
    with pytest.raises(ApiError) as info:
        placed(config, "acme/huge", [node("a", cpu_mb=1000), node("b", gpus=(2000,))])
    error = info.value
    assert error.status == 422 and error.code == "model_too_large"
    assert "5000 MiB" in error.message and "b/cuda:0" in error.message
    assert "2000 MiB" in error.message


def test_only_down_nodes_could_serve_gives_503_with_retry_after() -> None:
    config = models(ModelProfile(id="acme/m", memory_mb=10, nodes=["b"]))
    with pytest.raises(ApiError) as info:
        placed(config, "acme/m", [node("a"), node("b", up=False)])
    assert info.value.status == 503 and info.value.retry_after and "b" in info.value.message


def test_missing_harness_or_source_is_explained() -> None:
    config = models(ModelProfile(id="helexa:acme/m", memory_mb=10, harness="llamacpp"))
    with pytest.raises(ApiError) as info:
        placed(config, "helexa:acme/m", [node("a")])
    assert info.value.status == 422 and "llamacpp" in info.value.message


def test_a_load_running_on_a_neuron_is_joined_not_duplicated() -> None:
    config = models(ModelProfile(id="acme/m", memory_mb=500))
    a = node("a", cpu_mb=10_000)
    b = node("b", model("acme/m", mb=0, state="loading"), cpu_mb=600)
    p = placed(config, "acme/m", [a, b])
    assert (p.node, p.victims) == ("b", ())


def test_a_neuron_load_without_a_device_yet_is_joined_too() -> None:
    """The neuron lists a load before it picked a device: still joined, never duplicated."""
    config = models(ModelProfile(id="acme/m", memory_mb=500))
    a = node("a", cpu_mb=10_000)
    b = node("b", model("acme/m", mb=0, state="loading", device=""), cpu_mb=600)
    p = placed(config, "acme/m", [a, b])
    assert (p.node, p.device, p.victims) == ("b", "cpu", ())


# ---- health debounce ---------------------------------------------------------------------------


def test_health_is_down_after_three_failures_and_up_on_first_success() -> None:
    health = Health(down_after=3)
    assert not health.up
    assert health.record_success() is True
    assert [health.record_failure("x") for _ in range(3)] == [False, False, True]
    assert not health.up and health.failures == 3
    assert health.record_failure("x") is False
    assert health.record_success() is True and health.up and health.failures == 0
    health.record_failure("x")
    health.record_success()
    health.record_failure("x")
    health.record_failure("x")
    assert health.up  # misses must be consecutive
