"""One test per hook, and the guards that keep hooks, docs and tests in step (datasette style)."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import click
import click.testing
import pytest

from cortex import hookspecs
from cortex.devices import Device
from cortex.eviction import EvictionCandidate
from cortex.plugins import PluginRegistry

ROOT = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(n for n in dir(hookspecs) if n.startswith("cortex_"))


def hook_signature(name: str) -> str:
    fn = getattr(hookspecs, name)
    params = ", ".join(inspect.signature(fn).parameters)
    return f"{name}({params})"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature(name: str) -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### {hook_signature(name)}" in docs, (
        f"docs/plugins.md lacks '### {hook_signature(name)}'"
    )


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hook_has_a_test(name: str) -> None:
    sources = "\n".join(p.read_text() for p in ROOT.glob("tests/**/test_*.py"))
    assert re.search(rf"def test_hook_{name}\b", sources), f"no test_hook_{name} in tests/"


def test_every_documented_hook_exists() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    documented = set(re.findall(r"^### (cortex_\w+)\(", docs, re.MULTILINE))
    assert documented == set(HOOK_NAMES)


def test_hook_cortex_register_harnesses() -> None:
    registry = PluginRegistry(allowed={"harness-torch", "harness-llamacpp"})
    harnesses = {h.name: h for h in registry.harnesses()}
    assert {"torch", "llamacpp"} <= set(harnesses)
    for harness in harnesses.values():
        assert callable(harness.accepts) and callable(harness.load)


def test_hook_cortex_register_sources() -> None:
    registry = PluginRegistry(allowed={"source-huggingface", "source-helexa"})
    plugins = {p.name: p for p in registry.source_plugins()}
    assert plugins["helexa"].schemes == ("helexa",)
    assert plugins["helexa"].defaults("helexa").endpoint == "https://registry.helexa.ai"
    assert plugins["huggingface"].defaults("huggingface").auth_env == "HF_TOKEN"


def test_hook_cortex_register_eviction_strategies() -> None:
    strategies = PluginRegistry(allowed=set()).eviction_strategies()
    old, new = EvictionCandidate("old", 100, 1.0, priority=5), EvictionCandidate("new", 100, 2.0)
    assert strategies["lru"].plan([new, old], 150, 60).victims == ("old",)
    assert strategies["priority"].plan([new, old], 150, 60).victims == ("new",)


def test_hook_cortex_discover_devices() -> None:
    devices = PluginRegistry(allowed=set()).devices()
    cpu = [d for d in devices if d.kind == "cpu"]
    assert len(cpu) == 1
    assert isinstance(cpu[0], Device)
    assert cpu[0].worker_name == "cpu" and cpu[0].total_memory > 0


def test_hook_cortex_register_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "hello_plugin.py"
    module.write_text(
        textwrap.dedent(
            """
            import click
            from cortex.hookspecs import hookimpl

            @hookimpl
            def cortex_register_commands(cli, program):
                @cli.command(name="hello")
                def hello():
                    "Say hello."
                    click.echo(f"hello from {program}")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import hello_plugin  # type: ignore[import-not-found]

    registry = PluginRegistry(allowed=set())
    registry.pm.register(hello_plugin, name="hello")

    @click.group()
    def cli() -> None:
        pass

    registry.register_commands(cli, "neuron")
    result = click.testing.CliRunner().invoke(cli, ["hello"])
    assert result.output == "hello from neuron\n"
