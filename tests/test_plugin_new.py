"""``cortex plugin new``: every kind generates a distribution that builds, installs, is found by
the plugin registry through its entry point, passes its own tests and is lint-clean.

Nothing is installed into the test venv: each skeleton is pip-installed with ``--target`` into a
temporary folder that goes on ``PYTHONPATH`` of the subprocesses that use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from cortex.cli.cortex_cli import cli
from cortex.cli.plugin_new import PluginNameError, PluginNames, check_plugin_name
from cortex.testing.servers import ProcessServer, python_program

HOOK_OF_KIND = {
    "source": "cortex_register_sources",
    "harness": "cortex_register_harnesses",
    "eviction": "cortex_register_eviction_strategies",
}
LONGEST_NAME = "a-very-long-plugin-name-30-chr"


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pip_install_target(projects: list[Path], site: Path) -> None:
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            *map(str, projects),
        ],
        cwd=site.parent,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(HOOK_OF_KIND))
def test_generated_plugin_installs_registers_and_passes_its_tests(
    kind: str, tmp_path: Path
) -> None:
    assert len(LONGEST_NAME) == 30
    result = CliRunner().invoke(
        cli, ["plugin", "new", LONGEST_NAME, "--kind", kind, "--dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    names = PluginNames(LONGEST_NAME, kind)
    project = tmp_path / names.distribution
    assert str(project) in result.output

    # Lint first (a pip build leaves a build/ folder behind): the generated code is ruff-clean
    # under its own pyproject's settings, even with the longest allowed name.
    run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=project)
    run([sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."], cwd=project)

    site = tmp_path / "site"
    pip_install_target([project], site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    # Its own tests pass, run from its own folder with its own pytest settings.
    output = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project, env=env
    )
    assert " passed" in output and "failed" not in output

    # The plugin registry (behind `cortex plugins`) loads it by its entry point, with the hook
    # of its kind; its own test above already used the object it registers.
    listing = json.loads(
        run([sys.executable, "-m", "cortex.cli", "cortex", "plugins", "--json"], tmp_path, env)
    )
    by_name = {p["name"]: p for p in listing["plugins"]}
    assert by_name[names.entry_point]["hooks"] == [HOOK_OF_KIND[kind]]
    assert by_name[names.entry_point]["version"] == "0.1.0"
    assert listing["broken"] == []


@pytest.mark.slow
def test_generated_source_and_harness_serve_a_chat_in_a_real_neuron(tmp_path: Path) -> None:
    """The skeletons are not only self-consistent: a neuron loads a model through the generated
    source with the generated harness, and the openai client gets the harness's answer."""
    runner = CliRunner()
    for name, kind in (("byte-store", "source"), ("bytes", "harness")):
        args = ["plugin", "new", name, "--kind", kind, "--dir", str(tmp_path)]
        assert runner.invoke(cli, args).exit_code == 0
    site = tmp_path / "site"
    pip_install_target(
        [tmp_path / "cortex-source-byte-store", tmp_path / "cortex-harness-bytes"], site
    )
    repo = tmp_path / "store" / "acme" / "echoes"
    repo.mkdir(parents=True)
    (repo / "bytes.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(b"\0" * 8)  # the source skeleton wants weights
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'[sources.byte-store]\nendpoint = "file://{tmp_path / "store"}"\n'
        '[devices."cpu"]\nmemory_mb = 512\n'
    )
    argv = python_program(
        "cortex.cli", "neuron", "run", "-c", str(config), "--listen", "127.0.0.1:0"
    )
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    with ProcessServer(argv, env={"PYTHONPATH": pythonpath}) as neuron:
        loaded = httpx.post(
            f"{neuron.url}/models/load",
            json={"model_id": "byte-store:acme/echoes", "harness": "bytes"},
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["model"]["harness"] == "bytes"
        client = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="byte-store:acme/echoes", messages=[{"role": "user", "content": "bonjour"}]
        )
        assert reply.choices[0].message.content == "bonjour"
        missing = httpx.post(
            f"{neuron.url}/models/load", json={"model_id": "byte-store:acme/nope"}, timeout=60
        )
        assert missing.status_code == 422
        assert missing.json()["error"]["details"]["model_id"] == "byte-store:acme/nope"


def test_refuses_bad_names_and_existing_folders(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["plugin", "new", "My_Store", "--kind", "source"])
    assert bad.exit_code == 2
    assert "not a valid plugin name" in bad.output
    args = ["plugin", "new", "store", "--kind", "eviction", "--dir", str(tmp_path)]
    assert runner.invoke(cli, args).exit_code == 0
    again = runner.invoke(cli, args)
    assert again.exit_code == 1
    assert "already exists" in again.output
    wrong_kind = runner.invoke(cli, ["plugin", "new", "store", "--kind", "gpu"])
    assert wrong_kind.exit_code == 2
    shipped = runner.invoke(cli, ["plugin", "new", "torch", "--kind", "harness", "--dir", "x"])
    assert shipped.exit_code == 2
    assert "cortex-harness-torch is a distribution cortex ships" in shipped.output
    assert not Path("x").exists()


@pytest.mark.parametrize(
    "name", ["", "Store", "my_store", "-store", "store-", "my--store", "9store", "x" * 31]
)
def test_check_plugin_name_rejects(name: str) -> None:
    with pytest.raises(PluginNameError):
        check_plugin_name(name)


def test_names_derived_from_name_and_kind() -> None:
    names = PluginNames("my-store", "source")
    assert (names.distribution, names.package, names.entry_point, names.class_prefix) == (
        "cortex-source-my-store",
        "cortex_source_my_store",
        "source-my-store",
        "MyStore",
    )


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(cli, ["plugin", "new", "--help"])
    assert result.exit_code == 0
    assert "cortex plugin new my-store --kind source" in result.output
