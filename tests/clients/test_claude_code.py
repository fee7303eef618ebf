"""Claude Code (the pinned npm release) against a real fleet, set up as docs/clients.md says:
``-p`` with json and stream-json output, a tool loop that writes a file through its Bash tool,
the token count it asks for, and a wrong key that fails in seconds (x-should-retry: false)."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest

from cortex.demo.models import agent_spec
from cortex.testing.cluster import GatewayUnderTest

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

HELLO = [{"role": "user", "content": "hello"}]


def claude(
    agents: AgentFleet | GatewayUnderTest,
    tmp_path: Path,
    *args: str,
    key: str = KEY,
    model: str = "agents/claude",
    small: str = "agents/plain",
) -> tuple[Run, Path]:
    home, work = folders(tmp_path)
    env = {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": agents.url,
        "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": small,
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    run = run_agent([agent_binary("claude"), "-p", *args], work, env)
    return run, work


def test_a_tool_loop_writes_a_file(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    run, work = claude(
        agent_fleet,
        tmp_path,
        f"write {WRITTEN} to out.txt",
        "--output-format",
        "json",
        "--allowedTools",
        "Bash",
    )
    assert run.returncode == 0, describe(run)
    result = json.loads(run.stdout)
    assert (result["subtype"], result["is_error"], result["result"]) == ("success", False, DONE)
    assert result["num_turns"] == 2  # the Bash call, then the answer
    assert result["usage"]["input_tokens"] > 1000  # the prompt's real length came back
    assert (work / "out.txt").read_text().strip() == WRITTEN


def test_context_is_counted_by_the_gateway(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    """``/context`` asks count_tokens for the system prompt, tools and messages; every call is
    answered (the neuron's count of the rendered prompt), none falls back or fails."""
    counted = agent_fleet.requests("/v1/messages/count_tokens")
    errors = agent_fleet.gateway.metric(
        "cortex_request_errors_total", route="/v1/messages/count_tokens"
    )
    run, _work = claude(agent_fleet, tmp_path, "/context", "--output-format", "json")
    assert run.returncode == 0, describe(run)
    result = json.loads(run.stdout)
    assert result["is_error"] is False, result
    assert "tokens" in result["result"].lower()
    assert agent_fleet.requests("/v1/messages/count_tokens") > counted
    after = agent_fleet.gateway.metric(
        "cortex_request_errors_total", route="/v1/messages/count_tokens"
    )
    assert after == errors


def test_stream_json(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    run, work = claude(
        agent_fleet,
        tmp_path,
        "write the file",
        "--output-format",
        "stream-json",
        "--verbose",
        "--allowedTools",
        "Bash",
    )
    assert run.returncode == 0, describe(run)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "system" and kinds[-1] == "result", kinds
    assert lines[-1]["is_error"] is False and lines[-1]["result"] == DONE
    tool_uses = [
        block
        for line in lines
        if line["type"] == "assistant"
        for block in line["message"]["content"]
        if block["type"] == "tool_use"
    ]
    assert [block["name"] for block in tool_uses] == ["Bash"]
    assert (work / "out.txt").exists()


def test_a_wrong_key_fails_within_seconds(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    """The 401 says x-should-retry: false, so Claude Code stops at once (it retried for three
    minutes before: 11 attempts with backoff)."""
    failures = agent_fleet.gateway.metric("cortex_request_errors_total", code="invalid_api_key")
    run, _work = claude(agent_fleet, tmp_path, "hello", "--output-format", "json", key="wrong")
    assert run.seconds < 10, describe(run)
    result = json.loads(run.stdout)
    assert result["is_error"] is True, result
    assert result.get("api_error_status") == 401 or "401" in json.dumps(result), result
    after = agent_fleet.gateway.metric("cortex_request_errors_total", code="invalid_api_key")
    assert after > failures  # the refusals are counted (and in the request log)


def test_the_command_make_demo_prints(agent_fleet: AgentFleet, tmp_path: Path) -> None:
    """``make demo`` prints ANTHROPIC_MODEL=agent: its echo spec, served here, holds Claude
    Code's whole first request (the tiny model it named before could not)."""
    run, _work = claude(
        agent_fleet, tmp_path, "hello", "--output-format", "json", model="agent", small="agent"
    )
    assert run.returncode == 0, describe(run)
    result = json.loads(run.stdout)
    assert result["is_error"] is False, result
    assert result["result"] == agent_spec()["reply"]


def test_a_limited_key_waits_for_its_rate_then_stops_at_its_budget(
    limited_gateway: LimitedGateway, tmp_path: Path
) -> None:
    """A named key with rpm and a budget: Claude Code waits as Retry-After says when the rate is
    spent (and gets through), and stops at once, with the gateway's message, at the budget."""
    gateway, keys = limited_gateway(
        {"dev": "rpm=6", "spent": "budget_tokens=10 per=day models=agents/plain"}
    )
    args = ("--output-format", "json")
    drain = anthropic.Anthropic(base_url=gateway.url, api_key=keys["dev"], max_retries=0)
    with pytest.raises(anthropic.RateLimitError):  # the bucket holds 6; one back every 10 s
        for _ in range(7):
            drain.messages.create(model="agents/plain", max_tokens=16, messages=HELLO)
    (tmp_path / "rate").mkdir()
    run, _work = claude(gateway, tmp_path / "rate", "hello", *args, key=keys["dev"])
    assert run.returncode == 0 and 1 < run.seconds < 30, describe(run)  # waited, got through
    assert json.loads(run.stdout)["is_error"] is False, describe(run)
    for n in range(2):  # admitted with budget left, then refused
        (tmp_path / f"budget{n}").mkdir()
        run, _work = claude(
            gateway,
            tmp_path / f"budget{n}",
            "hello",
            *args,
            key=keys["spent"],
            model="agents/plain",
        )
        assert run.seconds < 10, describe(run)
    result = json.loads(run.stdout)
    assert result["is_error"] is True and "budget" in result["result"], result
