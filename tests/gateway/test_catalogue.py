"""The merged catalogue over plain fleet views."""

from __future__ import annotations

from cortex.config import ModelProfile, ModelsConfig
from cortex.gateway.catalogue import build_catalogue
from cortex.gateway.usage import Usage
from cortex.testing.fleet import model, node


def test_catalogue_merges_loaded_profiles_and_aliases_in_stable_order() -> None:
    config = ModelsConfig(
        models=[
            ModelProfile(id="acme/loadable", memory_mb=10, pinned=True),
            ModelProfile(id="acme/only-on-c", memory_mb=10, nodes=["c"]),
            ModelProfile(id="acme/needs-llamacpp", memory_mb=10, harness="llamacpp"),
        ],
        aliases={"fast": "acme/both", "pin": "huggingface:acme/loadable", "gone": "acme/nowhere"},
    )
    a = node("a", model("acme/both"), model("acme/failed", state="failed"))
    b = node("b", model("acme/both", in_flight=2), model("acme/loading-b", state="loading"))
    c = node("c", model("acme/on-down-node"), up=False)
    usage = Usage()
    usage.begin("a", "huggingface:acme/both")
    data = build_catalogue([b, c, a], config, usage, "huggingface")
    ids = [e["id"] for e in data]
    assert ids == sorted(ids)
    assert ids == [
        "fast",
        "gone",
        "huggingface:acme/both",
        "huggingface:acme/loadable",
        "huggingface:acme/loading-b",
        "pin",
    ]
    by_id = {e["id"]: e for e in data}
    both = by_id["huggingface:acme/both"]
    assert both["object"] == "model" and both["owned_by"] == "huggingface"
    assert both["state"] == "ready"
    assert [(p["node"], p["in_flight"]) for p in both["loaded_on"]] == [("a", 1), ("b", 2)]
    assert both["alias_for"] is None
    assert by_id["fast"]["alias_for"] == "huggingface:acme/both"
    assert by_id["fast"]["loaded_on"] == both["loaded_on"]
    assert by_id["huggingface:acme/loadable"]["state"] == "available"
    assert by_id["huggingface:acme/loadable"]["pinned"] is True
    assert by_id["pin"]["state"] == "available"
    assert by_id["huggingface:acme/loading-b"]["state"] == "loading"
    assert by_id["gone"]["state"] == "unavailable"
    # Same view, same answer.
    assert build_catalogue([a, b, c], config, usage, "huggingface") == data


def test_profile_appears_once_its_node_is_up() -> None:
    config = ModelsConfig(models=[ModelProfile(id="acme/only-on-c", nodes=["c"])])
    down = node("c", up=False)
    assert build_catalogue([node("a"), down], config, Usage(), "huggingface") == []
    listed = build_catalogue([node("a"), node("c")], config, Usage(), "huggingface")
    assert [e["id"] for e in listed] == ["huggingface:acme/only-on-c"]
