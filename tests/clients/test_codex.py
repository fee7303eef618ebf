"""Codex CLI (the pinned npm release) against a real fleet with a plain provider entry in its
``config.toml`` (docs/clients.md), no feature switches: every request carries its default tool
set (function tools, a ``namespace`` group, ``web_search``). ``exec`` turns, a tool loop through
``exec_command`` that writes a file, and ``exec resume --last``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .conftest import (
    DONE,
    KEY,
    WRITTEN,
    AgentFleet,
    LimitedGateway,
    Run,
    agent_binary,
    describe,
    folders,
    run_agent,
)

PROVIDER = """model = "{model}"
model_provider = "cortex"

[model_providers.cortex]
name = "cortex"
base_url = "{url}/v1"
env_key = "CORTEX_API_KEY"
wire_api = "responses"
"""


def codex_home(agents: AgentFleet, tmp_path: Path, model: str) -> tuple[Path, Path]:
    home, work = folders(tmp_path)
    (home / "config.toml").write_text(PROVIDER.format(model=model, url=agents.url))
    return home, work


def codex(home: Path, work: Path, *args: str, key: str = KEY) -> tuple[Run, list[dict[str, Any]]]:
    env = {"HOME": str(home), "CODEX_HOME": str(home), "CORTEX_API_KEY": key}
    argv = [agent_binary("codex"), "exec", "--json", "--skip-git-repo-check"]
    run = run_agent([*argv, "-s", "workspace-write", *args], work, env)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run, events


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["item"]["text"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
    ]


def commands(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e["item"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "command_execution"
    ]


def test_exec_turn_with_the_default_tool_set(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    """web_search is dropped (and named in x-cortex-dropped-tools), the namespace flattened:
    the turn completes without a config switch (it was a 400 unsupported_tool before)."""
    asked = agent_fleet.requests("/v1/responses")
    errors = agent_fleet.gateway.metric("cortex_request_errors_total", route="/v1/responses")
    home, work = codex_home(agent_fleet, tmp_path, "agents/plain")
    run, events = codex(home, work, "say hello")
    assert run.returncode == 0, describe(run)
    assert messages(events) == ["Hello from cortex."]
    assert events[-1]["type"] == "turn.completed", events[-1]
    assert events[-1]["usage"]["input_tokens"] > 1000
    assert agent_fleet.requests("/v1/responses") > asked
    assert agent_fleet.gateway.metric("cortex_request_errors_total", route="/v1/responses") == (
        errors
    )


def test_exec_command_tool_loop_and_resume(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    home, work = codex_home(agent_fleet, tmp_path, "agents/codex")
    run, events = codex(home, work, "write the file")
    assert run.returncode == 0, describe(run)
    [command] = commands(events)
    assert command["exit_code"] == 0 and WRITTEN in command["command"], command
    assert (work / "out.txt").read_text().strip() == WRITTEN
    assert messages(events) == [DONE]
    thread = events[0]["thread_id"]
    first_tokens = events[-1]["usage"]["input_tokens"]

    (work / "out.txt").unlink()
    run, events = codex(home, work, "resume", "--last", "once more")
    assert run.returncode == 0, describe(run)
    assert events[0]["thread_id"] == thread  # the same conversation, sent whole again
    assert messages(events) == [DONE]
    assert (work / "out.txt").exists()
    assert events[-1]["usage"]["input_tokens"] > first_tokens  # the history came along


def test_a_spent_budget_ends_the_session_in_seconds(
    limited_gateway: LimitedGateway, tmp_path: Path
) -> None:
    """A key over its budget: Codex stops with the message that says when it resets. Codex
    ignores x-should-retry and sleeps whatever Retry-After says; the budget's 429 said the hours
    until the reset, and ``codex exec`` hung until midnight."""
    gateway, keys = limited_gateway({"dev": "budget_tokens=10 per=day"})
    home, work = folders(tmp_path)
    (home / "config.toml").write_text(PROVIDER.format(model="agents/plain", url=gateway.url))
    first, events = codex(home, work, "hello", key=keys["dev"])
    assert first.returncode == 0, describe(first)
    assert messages(events) == ["Hello from cortex."]  # admitted with budget left; now spent
    second, events = codex(home, work, "hello again", key=keys["dev"])
    assert second.returncode != 0 and second.seconds < 30, describe(second)
    failed = [e for e in events if e["type"] == "turn.failed"]
    assert failed and "429" in failed[0]["error"]["message"], describe(second)
