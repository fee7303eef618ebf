"""``make demo ARGS=--once`` end to end: the real programs, the real SDKs, the walkthrough's checks.

The demo itself asserts what each step should show (the eviction picks the least recently used
model, the metrics carry an eviction sample, every stream carries text) and exits 1 when a step
fails; this test runs it as a user would and checks the exit code and the printed steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.demo.models import harness_installed


@pytest.mark.slow
def test_demo_once_walks_through_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "CORTEX_DEMO_ONCE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cortex.demo", "--data-dir", str(tmp_path / "d"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out
    for step in (
        "the merged catalogue: /v1/models",
        "a streamed chat with the openai SDK (cold load on first use)",
        "the same model through the anthropic SDK",
        "fleet status",
        "2/2 nodes up" if "$ cortex status" in out else "nodes up 2/2",
        "the same fleet in the browser: the dashboard",
        "/ui/ in a browser",
        "/ui/api/state, what the page draws now",
        "an eviction when a third model needs room",
        "the metrics that traffic produced",
        'node="beta",reason="memory"} 1.0',
        "walkthrough done",
    ):
        assert step in out, f"missing {step!r} in:\n{out}"
    if harness_installed("llamacpp"):
        assert "through the llama.cpp harness" in out
    # The configs were printed and written, and every child was stopped.
    config_dir = tmp_path / "d" / "config"
    assert {p.name for p in config_dir.iterdir()} == {
        "alpha.toml",
        "beta.toml",
        "models.toml",
        "cortex.toml",
    }
    assert (config_dir / "cortex.toml").read_text().splitlines()[0] in out
    assert "cortex keeps serving" not in out  # --once exits after the walkthrough
    evictions = [line for line in out.splitlines() if "cortex_evictions_total{" in line]
    assert len(evictions) == 1 and 'node="beta"' in evictions[0], evictions
    assert evictions[0].endswith(" 1.0"), evictions


def test_demo_configs_load_with_the_strict_loaders(tmp_path: Path) -> None:
    """The configs the demo prints are the ones the programs accept (checked without starting
    anything); a model missing from models.toml would make the walkthrough ask for nothing."""
    from cortex.config import load_models_config
    from cortex.demo.configs import Ports, write_configs
    from cortex.demo.models import AGENT_MODEL, ECHO_MODELS, DemoModels

    models = DemoModels(tmp_path / "repos", "demo/tiny-llama", None, ECHO_MODELS, AGENT_MODEL)
    configs = write_configs(tmp_path, Ports(1, 2, 3, 4, 5), models)
    loaded = load_models_config(configs.path("models.toml"))
    assert [m.id for m in loaded.models] == ["demo/tiny-llama", *ECHO_MODELS, AGENT_MODEL]
    assert loaded.aliases == {
        "tiny": "demo/tiny-llama",
        "echo": "demo/echo-a",
        "agent": AGENT_MODEL,
    }
    assert 'endpoint = "http://127.0.0.1:1"' in configs.path("alpha.toml").read_text()


def test_the_printed_claude_code_command_names_a_model_that_holds_its_prompt() -> None:
    """The demo printed ANTHROPIC_MODEL=tiny (a 256-token context) where Claude Code's first
    request is ~56k tokens: it could never work. It names the agent model now, whose spec
    tests/clients/test_claude_code.py runs the real Claude Code against."""
    from cortex.demo.main import claude_code_command
    from cortex.demo.models import AGENT_CONTEXT, agent_spec

    command = claude_code_command("http://127.0.0.1:31313")
    assert "ANTHROPIC_MODEL=agent " in command and "ANTHROPIC_DEFAULT_HAIKU_MODEL=agent" in command
    assert agent_spec()["context_length"] == AGENT_CONTEXT >= 200_000
