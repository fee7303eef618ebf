"""Simon Willison's ``llm`` (PyPI, with the test extras) against a real fleet, configured by an
``extra-openai-models.yaml`` as docs/clients.md shows: a prompt, a stream, and ``--functions``
(a tool call, its result sent back, the answer)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import KEY, AgentFleet, Run, describe, run_agent

MODELS = """- model_id: cortex-plain
  model_name: agents/plain
  api_base: {url}/v1
  api_key_name: cortex
- model_id: cortex-weather
  model_name: agents/weather
  api_base: {url}/v1
  api_key_name: cortex
  supports_tools: true
"""
WEATHER = '''def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C and dry in {city}"
'''


def llm_binary() -> Path:
    found = Path(sys.executable).parent / "llm"
    if not found.exists():
        which = shutil.which("llm")
        if which is None:
            pytest.fail("llm is not installed: it is in the test extras (make venv)")
        found = Path(which)
    return found


def llm(agents: AgentFleet, tmp_path: Path, *args: str) -> Run:
    user = tmp_path / "llm"
    user.mkdir(exist_ok=True)
    (user / "extra-openai-models.yaml").write_text(MODELS.format(url=agents.url))
    (user / "keys.json").write_text(json.dumps({"cortex": KEY}))
    env = {"HOME": str(tmp_path), "LLM_USER_PATH": str(user)}
    return run_agent([llm_binary(), *args], tmp_path, env, timeout=60)


def test_prompt_whole_and_streamed(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    for extra in (["--no-stream"], []):
        run = llm(agent_fleet, tmp_path, "-m", "cortex-plain", *extra, "hello")
        assert run.returncode == 0, describe(run)
        assert run.stdout.strip() == "Hello from cortex."


def test_functions_tool_loop(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    asked = agent_fleet.requests("/v1/chat/completions")
    run = llm(
        agent_fleet, tmp_path, "-m", "cortex-weather", "--td", "--functions", WEATHER, "weather?"
    )
    assert run.returncode == 0, describe(run)
    # --td reports the tool call and its result on stderr
    assert "get_weather({'city': 'Paris'})" in run.stderr, describe(run)
    assert "18C and dry in Paris" in run.stderr
    assert run.stdout.strip() == "It is sunny."
    # the call, then the request carrying its result, then nothing more
    assert agent_fleet.requests("/v1/chat/completions") == asked + 2
