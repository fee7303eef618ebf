"""Typed, isolated plugin collection: every registration is checked against its Protocol, and a
plugin that registers something malformed, whose hook raises, or whose source cannot be created
is reported broken by name, never fatal to the other plugins (cortex.plugins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import httpx
import pytest

from cortex.eviction import plan_in_order
from cortex.harness import Harness, LoadOptions
from cortex.harness_choice import accepting, choose_harness, ranked
from cortex.hookspecs import hookimpl
from cortex.plugins import HARNESSES, PluginRegistry, check_registration, protocol_members
from cortex.source import Preflight, RepoFile, SourcePlugin, WeightFormat
from cortex.testing.servers import ProcessServer, python_program
from cortex.wire.errors import ApiError


class GoodHarness:
    def __init__(self, name: str, accepted: str = "x.bin", priority: int | None = None) -> None:
        self.name = name
        self._accepted = accepted
        if priority is not None:
            self.priority = priority

    def accepts(self, preflight: Preflight) -> bool:
        return self._accepted in preflight.file_names()

    def files_needed(self, preflight: Preflight) -> list[str]:
        return [self._accepted]

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        return 1

    def load(self, snapshot: Path, device: object, options: LoadOptions) -> object:
        raise NotImplementedError


class NoLoad:
    name = "noload"

    def accepts(self, preflight: Preflight) -> bool:
        return True

    def files_needed(self, preflight: Preflight) -> list[str]:
        return []

    def estimate_memory(self, preflight: Preflight, options: LoadOptions) -> int:
        return 1


def plugin(**hooks: object) -> types.SimpleNamespace:
    """A plugin object whose attributes are hook implementations."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def registry_with(**plugins: types.SimpleNamespace) -> PluginRegistry:
    registry = PluginRegistry(allowed=set())  # built-ins only, then these
    for name, obj in plugins.items():
        registry.pm.register(obj, name=name)
    registry.pm.check_pending()
    return registry


def preflight(*files: str, fmt: str = WeightFormat.SAFETENSORS) -> Preflight:
    return Preflight(
        model_id="huggingface:acme/x",
        revision="0" * 40,
        weight_format=fmt,
        files=tuple(RepoFile(f, 1) for f in files),
    )


def test_a_harness_without_load_is_broken_and_the_others_are_collected() -> None:
    def bad(register):
        register(NoLoad())
        register(GoodHarness("fine"))

    registry = registry_with(badplugin=plugin(cortex_register_harnesses=bad))
    names = [h.name for h in registry.harnesses()]
    assert "noload" not in names
    assert {"echo", "fine"} <= set(names)  # the built-ins and the plugin's good registration
    (broken,) = registry.broken
    assert broken.name == "badplugin"
    assert "not a Harness" in broken.error and "lacks load" in broken.error


def test_a_registration_without_a_name_does_not_raise_out_of_harnesses() -> None:
    """It used to raise TypeError out of harnesses() and kill ``neuron run`` unnamed."""

    def nameless(register):
        harness = GoodHarness("x")
        harness.name = ""  # type: ignore[assignment]
        register(harness)

    registry = registry_with(nameless=plugin(cortex_register_harnesses=nameless))
    assert [h.name for h in registry.harnesses()] == ["echo"]
    assert [b.name for b in registry.broken] == ["nameless"]
    assert "non-empty string 'name'" in registry.broken[0].error


def test_a_hook_that_raises_is_broken_and_registers_nothing() -> None:
    def half(register):
        register(GoodHarness("half"))
        raise RuntimeError("boom in the hook")

    def good(register):
        register(GoodHarness("good"))

    registry = registry_with(
        raising=plugin(cortex_register_harnesses=half),
        fine=plugin(cortex_register_harnesses=good),
    )
    assert sorted(h.name for h in registry.harnesses()) == ["echo", "good"]
    assert registry.broken[0].name == "raising"
    assert "RuntimeError: boom in the hook" in registry.broken[0].error
    # collecting again reports the same failure once
    registry.harnesses()
    assert len(registry.broken) == 1


def test_every_collection_checks_its_protocol() -> None:
    class NotAStrategy:
        name = "half"

    class NotASource:
        name = "nosource"
        schemes = ("x",)

    registry = registry_with(
        p1=plugin(cortex_register_eviction_strategies=lambda register: register(NotAStrategy())),
        p2=plugin(cortex_register_sources=lambda register: register(NotASource())),
        p3=plugin(cortex_discover_devices=lambda register: register("a string")),
    )
    assert set(registry.eviction_strategies()) == {"lru", "priority"}
    assert registry.source_plugins() == []
    assert all(isinstance(d, object) and not isinstance(d, str) for d in registry.devices())
    errors = {b.name: b.error for b in registry.broken}
    assert "lacks plan" in errors["p1"]
    assert "lacks defaults, create" in errors["p2"]
    assert "not a Device" in errors["p3"]


def test_a_broken_command_plugin_leaves_the_others_commands() -> None:
    import click

    def broken(cli):
        raise RuntimeError("no commands today")

    def adds(cli):
        @cli.command("hello")
        def hello() -> None:
            click.echo("hi")

    registry = registry_with(
        a=plugin(cortex_register_commands=broken), b=plugin(cortex_register_commands=adds)
    )
    group = click.Group("cortex")
    registry.register_commands(group, "cortex")
    assert "hello" in group.commands
    assert [b.name for b in registry.broken] == ["a"]


def test_protocol_members_are_what_the_docs_list() -> None:
    assert protocol_members(Harness) == [
        "name",
        "accepts",
        "files_needed",
        "estimate_memory",
        "load",
    ]
    assert protocol_members(SourcePlugin) == ["name", "schemes", "defaults", "create"]
    assert check_registration(GoodHarness("ok"), HARNESSES) is None


# ---- the one harness choice -----------------------------------------------------------------


def test_the_harness_choice_rule() -> None:
    both = preflight("x.bin")
    zeta, alpha = GoodHarness("zeta"), GoodHarness("alpha")
    # equal priority: the name that sorts first, whatever the registration order
    assert choose_harness([zeta, alpha], both).name == "alpha"
    assert choose_harness([alpha, zeta], both).name == "alpha"
    # a higher priority wins
    eager = GoodHarness("zeta-eager", priority=10)
    assert choose_harness([alpha, eager], both).name == "zeta-eager"
    assert [h.name for h in ranked([alpha, eager, zeta])] == ["zeta-eager", "alpha", "zeta"]
    # only accepting ones count
    other = GoodHarness("aaa-other", accepted="y.bin", priority=99)
    assert [h.name for h in accepting([other, zeta], both)] == ["zeta"]
    # a named harness is used, or the request fails: never swapped for another
    assert choose_harness([alpha, zeta], both, "zeta").name == "zeta"
    with pytest.raises(ApiError) as rejected:
        choose_harness([alpha, other], both, "aaa-other")
    assert (rejected.value.status, rejected.value.code) == (422, "harness_rejects_repo")
    with pytest.raises(ApiError) as unknown:
        choose_harness([alpha], both, "nope")
    assert (unknown.value.status, unknown.value.param) == (400, "harness")
    with pytest.raises(ApiError) as none:
        choose_harness([other], both)
    assert none.value.code == "no_harness"
    with pytest.raises(ApiError) as empty:
        choose_harness([other], preflight("README.md", fmt=WeightFormat.NONE))
    assert empty.value.code == "no_loadable_weights"
    assert empty.value.details is not None and empty.value.details["files"] == ["README.md"]


def test_no_plugin_reaches_into_the_global_registry() -> None:
    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for folder in ("plugins", "examples")
        for path in (root / folder).rglob("*.py")
        if "/tests/" not in str(path) and "get_registry" in path.read_text()
    ]
    assert offenders == []


# ---- a source plugin whose create fails -----------------------------------------------------

# cortex-source-helexa builds its sources with the huggingface plugin's HubSource: installed
# without cortex-source-huggingface, its create raises ModuleNotFoundError. A shadow package
# ahead of the real one on PYTHONPATH makes that so without uninstalling anything.
SHADOW = """raise ModuleNotFoundError(
    "No module named 'cortex_source_huggingface'", name="cortex_source_huggingface"
)
"""


@pytest.fixture
def without_huggingface(tmp_path: Path) -> dict[str, str]:
    shadow = tmp_path / "shadow" / "cortex_source_huggingface"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(SHADOW)
    path = f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {"PYTHONPATH": path, "CORTEX_PLUGINS": "source-helexa"}


def test_helexa_without_huggingface_does_not_crash_the_neuron(
    without_huggingface: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            name = "lonely"
            default_source = "helexa"
            [sources.helexa]
            endpoint = "http://127.0.0.1:9"
            cache_dir = "{tmp_path / "helexa-cache"}"
            """
        )
    )
    args = python_program(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"
    )
    with ProcessServer(args, env=without_huggingface) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
        sources = httpx.get(f"{server.url}/discovery", timeout=30).json()["sources"]
        helexa = next(s for s in sources if s["scheme"] == "helexa")
        assert helexa["installed"] is False
        answer = httpx.post(
            f"{server.url}/models/load", json={"model_id": "helexa:acme/x"}, timeout=30
        )
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["code"] == "source_plugin_missing"
        assert "failed to start" in error["message"]
    assert "Traceback" not in server.text
    assert "could not be created by the plugin 'helexa' (ModuleNotFoundError" in server.text


def test_cortex_plugins_names_the_source_plugin_that_cannot_start(
    without_huggingface: dict[str, str],
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "cortex", "plugins", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **without_huggingface},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert "source-helexa" in {p["name"] for p in payload["plugins"]}
    broken = {b["name"]: b["error"] for b in payload["broken"]}
    assert "ModuleNotFoundError" in broken["source-helexa"]
    assert "'helexa'" in broken["source-helexa"]


def test_cortex_plugins_shows_what_each_plugin_provides() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "cortex", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    by_name = {p["name"]: p["provides"] for p in json.loads(result.stdout)["plugins"]}
    assert by_name["harness-torch"] == {"harnesses": ["torch"]}
    assert by_name["source-helexa"] == {"sources": ["helexa"], "schemes": ["helexa"]}
    assert by_name["cortex.builtins.eviction"] == {"eviction_strategies": ["lru", "priority"]}
    assert by_name["cortex.builtins.echo"] == {"harnesses": ["echo"]}
    table = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "neuron", "plugins"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "  harnesses: llamacpp" in table.stdout


def test_a_strategy_plugin_still_plans() -> None:
    class Mru:
        name = "mru"

        def plan(self, candidates, bytes_needed, bytes_free):
            return plan_in_order(candidates, bytes_needed, bytes_free)

    registry = registry_with(
        mru=plugin(cortex_register_eviction_strategies=lambda register: register(Mru()))
    )
    assert set(registry.eviction_strategies()) == {"lru", "mru", "priority"}
    assert registry.broken == []
