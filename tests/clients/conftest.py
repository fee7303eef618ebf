"""The real coding agents against a real fleet (docs/clients.md).

Claude Code and Codex CLI are the pinned npm packages ``make clients`` installs into
``tests/clients/npm/node_modules`` (git-ignored, kept between runs); ``llm`` comes from PyPI with
the test extras. The fleet is the in-suite registry, one ``neuron run`` process with scripted
``echo`` models (one calls the agent's shell tool, then answers), and a gateway with an API key,
set up as docs/clients.md tells a user to. Each agent runs with its own HOME and working folder.

Without node/npm the Claude Code and Codex tests skip and say so; with npm but without the
installed agents they fail (``make test`` installs them: a silent skip would hide a regression).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from cortex.auth import GatewayAuth, KeySet, hash_key
from cortex.config import (
    AuthSection,
    CortexConfig,
    Duration,
    GatewaySection,
    ModelProfile,
    ModelsConfig,
    NeuronRef,
    UsageSection,
)
from cortex.demo.models import AGENT_MODEL, agent_spec
from cortex.gateway.app import create_app
from cortex.gateway.service import Gateway, load_strategy
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.registry import start_registry
from cortex.testing.servers import UvicornThread

AGENT_BIN = Path(__file__).parent / "npm" / "node_modules" / ".bin"
KEY = "ck-agents-test-key"
# Claude Code's first request is ~56k tokens (its system prompt and tools); an agent model
# needs a context that holds it (docs/clients.md).
AGENT_CONTEXT = 262144
WRITTEN = "hello-from-cortex"
DONE = "Done: the file is written."


def agent_binary(name: str) -> Path:
    """The installed agent, or a skip (no node/npm here) or a failure (npm but not installed)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip(f"node/npm not found: the {name} runs need them (make clients installs it)")
    path = AGENT_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make clients` (make test does)")
    return path


@attrs.define
class AgentFleet:
    fleet: Fleet
    gateway: GatewayUnderTest

    @property
    def url(self) -> str:
        return self.gateway.url

    def requests(self, route: str) -> float:
        return self.gateway.metric("cortex_requests_total", route=route)


def models(fleet: Fleet) -> list[ModelProfile]:
    fleet.publish_echo(
        "agents/claude",
        reply=DONE,
        context_length=AGENT_CONTEXT,
        tool_calls=[
            {
                "name": "Bash",
                "arguments": {"command": f"echo {WRITTEN} > out.txt", "description": "write"},
            }
        ],
    )
    fleet.publish_echo(
        "agents/codex",
        reply=DONE,
        context_length=AGENT_CONTEXT,
        tool_calls=[{"name": "exec_command", "arguments": {"cmd": f"echo {WRITTEN} > out.txt"}}],
    )
    fleet.publish_echo(
        "agents/weather",
        reply="It is sunny.",
        context_length=AGENT_CONTEXT,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    fleet.publish_echo("agents/plain", reply="Hello from cortex.", context_length=AGENT_CONTEXT)
    fleet.publish_echo(AGENT_MODEL, **agent_spec())  # exactly what `make demo` serves
    names = ("claude", "codex", "weather", "plain")
    profiles = [ModelProfile(id=f"agents/{name}", memory_mb=64) for name in names]
    return [*profiles, ModelProfile(id=AGENT_MODEL, memory_mb=64)]


@pytest.fixture(scope="session")
def agent_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentFleet]:
    """Registry, one neuron, and a gateway that wants ``KEY`` (auth on, as in production)."""
    tmp = tmp_path_factory.mktemp("agents")
    fleet = Fleet(tmp, start_registry(tmp / "repos"))
    try:
        fleet.start_neurons(agents=2000)
        config = CortexConfig(
            gateway=GatewaySection(
                poll_interval=Duration(0.2), retry_after=2, stream_keepalive=Duration(2.0)
            ),
            neurons=[NeuronRef(name, fleet.neuron_url(name)) for name in fleet.neurons],
        )
        gateway = Gateway(
            config,
            ModelsConfig(models=models(fleet), aliases={"agent": AGENT_MODEL}),
            load_strategy("lru"),
        )
        auth = GatewayAuth(KeySet.from_keys([KEY]), KeySet(), required=True)
        server = UvicornThread(create_app(gateway, auth)).start()
        fleet.gateways.append(server)
        yield AgentFleet(fleet, GatewayUnderTest(gateway, server))
    finally:
        fleet.stop()


LimitedGateway = Callable[[dict[str, str]], tuple[GatewayUnderTest, dict[str, str]]]


@pytest.fixture
def limited_gateway(agent_fleet: AgentFleet, tmp_path: Path) -> Iterator[LimitedGateway]:
    """A second gateway in front of the agents' neuron whose keys are named and limited, from a
    key file as docs/security.md writes it: ``start({"alice": "rpm=60"})`` returns the gateway
    and each name's secret key."""
    servers: list[UvicornThread] = []

    def start(keys: dict[str, str]) -> tuple[GatewayUnderTest, dict[str, str]]:
        secrets = {name: f"ck-{name}-agents-limited-key" for name in keys}
        key_file = tmp_path / f"keys-{len(servers)}.txt"
        key_file.write_text(
            "".join(f"{hash_key(secrets[name])} {name} {attrs}\n" for name, attrs in keys.items())
        )
        fleet = agent_fleet.fleet
        config = CortexConfig(
            gateway=GatewaySection(poll_interval=Duration(0.2), stream_keepalive=Duration(2.0)),
            auth=AuthSection(keys_file=str(key_file)),
            usage=UsageSection(store="off"),
            neurons=[NeuronRef(name, fleet.neuron_url(name)) for name in fleet.neurons],
        )
        gateway = Gateway(
            config,
            ModelsConfig(models=models(fleet), aliases={"agent": AGENT_MODEL}),
            load_strategy("lru"),
        )
        server = UvicornThread(create_app(gateway)).start()
        servers.append(server)
        return GatewayUnderTest(gateway, server), secrets

    yield start
    for server in servers:
        server.stop()


@attrs.define
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_agent(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120) -> Run:
    """One agent command with a clean environment (only what docs/clients.md sets, PATH and
    HOME): a developer's own keys or settings must not leak into the run."""
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }
    started = time.monotonic()
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(HOME, working folder) for one agent run."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def describe(run: Run) -> dict[str, Any]:
    return {"rc": run.returncode, "stdout": run.stdout[-3000:], "stderr": run.stderr[-3000:]}
