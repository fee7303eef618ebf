"""Placement and eviction of replicas that span several devices of a node (``devices`` in a
model's profile), over plain fleet views."""

from __future__ import annotations

import attrs
import pytest

from cortex.config import ModelProfile, ModelsConfig
from cortex.eviction import LruStrategy
from cortex.gateway.nodes import NodeModel
from cortex.gateway.router import Resolved, device_free, eviction_candidates, place
from cortex.gateway.usage import Usage
from cortex.testing.fleet import MIB, model, node
from cortex.wire.errors import ApiError

HF = "huggingface"


def spanning(model_id: str, mb: int, devices: tuple[str, ...], **kwargs: object) -> NodeModel:
    """A replica over ``devices`` holding ``mb`` in all (an equal share on each)."""
    return attrs.evolve(model(model_id, mb=mb, device=devices[0], **kwargs), devices=devices)


def placed(profile: ModelProfile, nodes: list, usage: Usage | None = None):  # type: ignore[no-untyped-def]
    config = ModelsConfig(models=[profile])
    canonical = f"huggingface:{profile.id}"
    resolved = Resolved(profile.id, canonical, profile)
    needed = (profile.memory_mb or 0) * MIB
    return place(resolved, needed, nodes, usage or Usage(), LruStrategy(), config, HF)


def test_a_two_device_replica_goes_where_two_devices_each_hold_half() -> None:
    profile = ModelProfile(id="acme/big", memory_mb=1600, devices=2)
    # a: one 24 GB card is big enough for the whole model but a has no second device free
    # enough; b: two 1000 MB devices hold 800 MB each
    a = node("a", model("acme/x", mb=900, device="cuda:1"), gpus=(2400, 1000))
    b = node("b", gpus=(1000, 1000, 500))
    p = placed(profile, [a, b])
    assert (p.node, p.device, p.devices, p.victims) == ("b", "cuda:0", ("cuda:0", "cuda:1"), ())


def test_no_node_with_enough_devices_says_why() -> None:
    profile = ModelProfile(id="acme/big", memory_mb=1600, devices=3)
    with pytest.raises(ApiError) as info:
        placed(profile, [node("a", gpus=(1000, 1000))])
    assert info.value.status == 503
    assert "a has 2 usable device(s), not 3" in info.value.message


def test_a_spanning_replica_holds_its_share_on_each_device() -> None:
    big = spanning("acme/big", 1600, ("cuda:0", "cuda:1"))
    n = node("a", big, gpus=(1000, 1000, 1000))
    devices = {d.key: d for d in n.discovery.devices}
    assert device_free(n, devices["cuda:0"], Usage()) == 200 * MIB
    assert device_free(n, devices["cuda:1"], Usage()) == 200 * MIB
    assert device_free(n, devices["cuda:2"], Usage()) == 1000 * MIB
    # it is an eviction candidate on both devices, for its share there
    for key in ("cuda:0", "cuda:1"):
        (candidate,) = eviction_candidates(n, devices[key], Usage(), ModelsConfig(), HF)
        assert (candidate.model_id, candidate.memory_bytes) == (big.id, 800 * MIB)


def test_evicting_a_spanning_replica_frees_all_its_devices_for_a_new_one() -> None:
    """A new two-device model where an idle two-device one lives: one victim, counted once,
    makes room on both devices."""
    old = spanning("acme/old", 1800, ("cuda:0", "cuda:1"), last_used=1.0)
    n = node("a", old, gpus=(1000, 1000))
    p = placed(ModelProfile(id="acme/new", memory_mb=1600, devices=2), [n])
    assert p.victims == (old.id,)
    assert p.freed_bytes == 900 * MIB  # its share on the first device; the second is freed too
    assert p.devices == ("cuda:0", "cuda:1")


def test_a_single_device_model_evicts_a_spanning_one_and_skips_reserved_devices() -> None:
    old = spanning("acme/old", 1800, ("cuda:0", "cuda:1"), last_used=1.0)
    n = node("a", old, gpus=(1000, 1000))
    # the neuron marks cuda:1 reserved for acme/old: nothing else is placed there
    devices = tuple(
        attrs.evolve(d, reserved_by=old.id) if d.key == "cuda:1" else d for d in n.discovery.devices
    )
    n = attrs.evolve(n, discovery=attrs.evolve(n.discovery, devices=devices))
    p = placed(ModelProfile(id="acme/small", memory_mb=500), [n])
    assert (p.device, p.victims) == ("cuda:0", (old.id,))


def test_a_busy_spanning_replica_is_never_evicted() -> None:
    old = spanning("acme/old", 1800, ("cuda:0", "cuda:1"), in_flight=1)
    n = node("a", old, gpus=(1000, 1000))
    with pytest.raises(ApiError) as info:
        placed(ModelProfile(id="acme/new", memory_mb=1600, devices=2), [n])
    assert info.value.code == "insufficient_memory"
