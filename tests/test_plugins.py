"""The plugin system: built-ins, entry points, CORTEX_PLUGINS, broken plugins, listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cortex.devices import Device
from cortex.eviction import EvictionCandidate
from cortex.plugins import PluginRegistry, allowed_from_env

INSTALLED_PLUGINS = {
    "source-huggingface",
    "source-helexa",
    "harness-torch",
    "harness-llamacpp",
    "harness-vllm",
}
BUILTINS = {"cortex.builtins.eviction", "cortex.builtins.devices", "cortex.builtins.echo"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_allowed_from_env() -> None:
    assert allowed_from_env({}) is None
    assert allowed_from_env({"CORTEX_PLUGINS": ""}) == set()
    assert allowed_from_env({"CORTEX_PLUGINS": "a, b"}) == {"a", "b"}


def test_builtins_only_registry() -> None:
    registry = PluginRegistry(allowed=set())
    names = {info.name for info in registry.plugin_infos()}
    assert names == BUILTINS
    assert set(registry.eviction_strategies()) == {"lru", "priority"}
    assert [h.name for h in registry.harnesses()] == ["echo"]


def test_full_registry_collects_every_hook() -> None:
    registry = PluginRegistry(allowed=None)
    names = {info.name for info in registry.plugin_infos()}
    assert names >= INSTALLED_PLUGINS | BUILTINS
    assert {"torch", "llamacpp"} <= {h.name for h in registry.harnesses()}
    assert {"huggingface", "helexa"} <= {s.name for s in registry.source_plugins()}
    devices = registry.devices()
    assert any(isinstance(d, Device) and d.kind == "cpu" for d in devices)


def test_cortex_plugins_json_lists_plugins_and_strategies() -> None:
    result = run_cli("cortex", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    by_name = {p["name"]: p for p in payload["plugins"]}
    assert set(by_name) >= INSTALLED_PLUGINS | BUILTINS
    assert by_name["cortex.builtins.eviction"]["builtin"] is True
    assert by_name["cortex.builtins.eviction"]["hooks"] == ["cortex_register_eviction_strategies"]
    assert by_name["source-helexa"]["builtin"] is False
    assert by_name["source-helexa"]["version"] == "0.1.0"
    assert by_name["harness-torch"]["hooks"] == ["cortex_register_harnesses"]
    assert payload["broken"] == []


def test_neuron_plugins_table() -> None:
    result = run_cli("neuron", "plugins")
    assert result.returncode == 0, result.stderr
    assert "source-huggingface" in result.stdout
    assert "built-in" in result.stdout


def test_cortex_plugins_env_limits_entry_points() -> None:
    result = run_cli("cortex", "plugins", "--json", env={"CORTEX_PLUGINS": "source-helexa"})
    names = {p["name"] for p in json.loads(result.stdout)["plugins"]}
    assert names == BUILTINS | {"source-helexa"}
    empty = run_cli("cortex", "plugins", "--json", env={"CORTEX_PLUGINS": ""})
    assert {p["name"] for p in json.loads(empty.stdout)["plugins"]} == BUILTINS


def _fake_distribution(root: Path, name: str, module_source: str) -> None:
    """Install-free: a dist-info folder plus a module on a path we prepend to PYTHONPATH."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist = root / f"{name}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[cortex]\n{name} = {name}\n")


@pytest.mark.parametrize(
    ("module_source", "error_fragment"),
    [
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        (
            """
            from cortex.hookspecs import hookimpl

            @hookimpl
            def cortex_register_harnessses(register):
                pass
            """,
            "cortex_register_harnessses",
        ),
    ],
    ids=["import-error", "misspelled-hook"],
)
def test_broken_plugin_is_reported_not_fatal(
    tmp_path: Path, module_source: str, error_fragment: str
) -> None:
    _fake_distribution(tmp_path, "brokenplugin", module_source)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_cli("cortex", "plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    broken = {b["name"]: b["error"] for b in payload["broken"]}
    assert error_fragment in broken["brokenplugin"]
    names = {p["name"] for p in payload["plugins"]}
    assert "brokenplugin" not in names
    assert names >= INSTALLED_PLUGINS
    assert "brokenplugin" in result.stderr


def test_third_party_plugin_registers_through_hooks(tmp_path: Path) -> None:
    _fake_distribution(
        tmp_path,
        "mostrecent",
        """
        from cortex.hookspecs import hookimpl
        from cortex.eviction import plan_in_order

        class MostRecent:
            name = "mru"

            def plan(self, candidates, bytes_needed, bytes_free):
                ordered = sorted(candidates, key=lambda c: -c.last_used)
                return plan_in_order(ordered, bytes_needed, bytes_free)

        @hookimpl
        def cortex_register_eviction_strategies(register):
            register(MostRecent())
        """,
    )
    code = textwrap.dedent(
        """
        import json
        from cortex.plugins import PluginRegistry
        from cortex.eviction import EvictionCandidate
        registry = PluginRegistry(allowed={"mostrecent"})
        strategies = registry.eviction_strategies()
        plan = strategies["mru"].plan(
            [EvictionCandidate("a", 10, 1.0), EvictionCandidate("b", 10, 2.0)], 10, 0
        )
        print(json.dumps({"names": sorted(strategies), "victims": list(plan.victims)}))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"names": ["lru", "mru", "priority"], "victims": ["b"]}


def test_eviction_candidate_shape() -> None:
    candidate = EvictionCandidate("m", 1, 0.0, pinned=True)
    assert not candidate.evictable


def test_loading_every_plugin_imports_no_heavy_library() -> None:
    """A gateway loads every installed plugin; none may pull in torch & co. at import."""
    code = textwrap.dedent(
        """
        import json, sys
        from cortex.plugins import PluginRegistry
        registry = PluginRegistry(allowed=None)
        registry.harnesses(); registry.source_plugins(); registry.eviction_strategies()
        heavy = ["torch", "transformers", "llama_cpp", "huggingface_hub", "safetensors"]
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
