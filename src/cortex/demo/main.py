"""The demo's command line: ``python -m cortex.demo [--once]`` (``make demo``, ``cortex demo``).

Order of events: build the models, pick ports, write and print the configs, start the registry,
both neurons (in parallel) and the gateway, wait until the gateway sees both neurons, run the
walkthrough, then keep serving until Ctrl-C (or exit at once with ``--once`` /
``CORTEX_DEMO_ONCE=1``). Every child is stopped on the way out, whatever happened.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from cortex.demo.configs import ALPHA, BETA, NO_TOKEN_ENV, DemoConfigs, Ports, write_configs
from cortex.demo.models import ECHO_MEMORY_MB, DemoModels, build_demo_models
from cortex.demo.processes import Child, ChildFailed, start_child, stop_all
from cortex.demo.walkthrough import Fleet, StepFailed, banner, run_walkthrough, wait_for_nodes

START_TIMEOUT = 120.0


def say(text: str = "") -> None:
    click.echo(text)


def _program(*args: str) -> list[str]:
    """argv for ``cortex ...`` / ``neuron ...`` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "cortex.cli", *args]


def _child_env() -> dict[str, str]:
    # CPU only (the demo is the same everywhere), no token sent to the local registry, and no
    # library phoning home.
    return {
        "CUDA_VISIBLE_DEVICES": "",
        NO_TOKEN_ENV: "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def print_configs(configs: DemoConfigs) -> None:
    for path in configs.files.values():
        say(f"--- {path} " + "-" * max(0, 60 - len(str(path))))
        say(path.read_text().rstrip())
    say("")


def start_fleet(
    data_dir: Path, ports: Ports, configs: DemoConfigs, models: DemoModels, children: list[Child]
) -> Fleet:
    logs = data_dir / "logs"
    env = _child_env()
    registry = start_child(
        "registry",
        _program(
            "cortex",
            "registry",
            "serve",
            str(models.repos_dir),
            "--listen",
            f"127.0.0.1:{ports.registry}",
        ),
        logs,
        env,
    )
    children.append(registry)
    registry.wait_listening(START_TIMEOUT)
    say(f"registry  {registry.url}  (cortex registry serve {models.repos_dir})")
    neurons = {}
    for name in (ALPHA, BETA):
        neurons[name] = start_child(
            f"neuron-{name}",
            _program(
                "neuron", "run", "-c", str(configs.path(f"{name}.toml")), "--drain-seconds", "5"
            ),
            logs,
            env,
        )
        children.append(neurons[name])
    for name, child in neurons.items():
        child.wait_listening(START_TIMEOUT)
        say(f"neuron    {child.url}  (neuron run -c {configs.path(f'{name}.toml')})")
    gateway = start_child(
        "gateway", _program("cortex", "serve", "-c", str(configs.path("cortex.toml"))), logs, env
    )
    children.append(gateway)
    gateway.wait_listening(START_TIMEOUT)
    metrics = gateway.metrics_url() or f"http://127.0.0.1:{ports.metrics}/metrics"
    say(f"gateway   {gateway.url}  (cortex serve -c {configs.path('cortex.toml')})")
    say(f"metrics   {metrics}")
    say(f"dashboard {gateway.url}/ui/  (open it in a browser)")
    say(f"logs      {logs}/*.log")
    fleet = Fleet(
        gateway=gateway.url,
        metrics=metrics,
        neurons={n: c.url for n, c in neurons.items()},
        registry=registry.url,
    )
    wait_for_nodes(fleet, 2)
    return fleet


def claude_code_command(gateway: str) -> str:
    """The Claude Code command the demo prints: the ``agent`` model (its context holds Claude
    Code's ~56k-token first request; tests/clients runs Claude Code against the same spec)."""
    return (
        f"ANTHROPIC_BASE_URL={gateway} ANTHROPIC_AUTH_TOKEN=demo \\\n"
        "  ANTHROPIC_MODEL=agent ANTHROPIC_DEFAULT_HAIKU_MODEL=agent claude"
    )


def print_serving(fleet: Fleet, models: DemoModels, data_dir: Path) -> None:
    banner(say, 0, "cortex keeps serving; try it")
    say(f"OpenAI API     {fleet.gateway}/v1   (models: {fleet.gateway}/v1/models)")
    say(f"Anthropic API  {fleet.gateway}/v1/messages")
    say(f"Metrics        {fleet.metrics}")
    say(f"Health         {fleet.gateway}/health")
    say(f"Dashboard      {fleet.gateway}/ui/   (in a browser: the fleet live; load, unload, pin)")
    say(f"Fleet status   .venv/bin/cortex status --endpoint {fleet.gateway}")
    say(f"               .venv/bin/cortex models --endpoint {fleet.gateway}")
    say("")
    say("curl:")
    say(
        f"  curl -s {fleet.gateway}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "echo", "messages": [{{"role": "user", "content": "hi"}}]}}\''
    )
    say("")
    say("openai SDK / tools that read the OpenAI env vars:")
    say(f"  export OPENAI_BASE_URL={fleet.gateway}/v1 OPENAI_API_KEY=demo")
    say("")
    say("Claude Code (the 'agent' echo model: a 256k context for its ~56k-token prompt;")
    say("the tiny models' 256 tokens cannot hold it). docs/clients.md has Codex, llm, aider:")
    say("  " + claude_code_command(fleet.gateway))
    say("")
    say(f"Logs in {data_dir / 'logs'}; configs in {data_dir / 'config'}. Ctrl-C stops everything.")


def _client_errors() -> tuple[type[Exception], ...]:
    """What the SDKs and httpx raise when a step's request fails (reported, not a traceback)."""
    import anthropic
    import httpx
    import openai

    return (anthropic.APIError, openai.APIError, httpx.HTTPError)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(data_dir: Path, once: bool, port: int | None) -> int:
    data_dir = data_dir.resolve()
    children: list[Child] = []
    if threading.current_thread() is threading.main_thread():
        # Explicit for SIGINT too: a shell starting the demo in the background ignores it.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, _raise_interrupt)
    started = time.monotonic()
    try:
        banner(say, 0, f"building the demo models in {data_dir}")
        models = build_demo_models(data_dir, say)
        ports = Ports.pick(port)
        configs = write_configs(data_dir, ports, models)
        banner(say, 0, "the configs (two neurons, one gateway)")
        print_configs(configs)
        banner(say, 0, "starting the registry, two neurons and the gateway")
        fleet = start_fleet(data_dir, ports, configs, models, children)
        run_walkthrough(say, fleet, models, ECHO_MEMORY_MB)
        say("")
        say(f"walkthrough done in {time.monotonic() - started:.1f} s")
        if once:
            return 0
        print_serving(fleet, models, data_dir)
        while all(child.proc.poll() is None for child in children):
            time.sleep(0.5)
        dead = [c for c in children if c.proc.poll() is not None]
        for child in dead:
            say(f"{child.name} exited ({child.proc.returncode}); its log:\n{child.log_tail()}")
        return 1
    except (ChildFailed, StepFailed, OSError, *_client_errors()) as exc:  # type: ignore[misc]
        say(f"demo failed: {type(exc).__name__}: {exc}")
        for child in children:
            say(f"  log of {child.name}: {child.log_path}")
        return 1
    except KeyboardInterrupt:
        say("")
        say("stopping")
        return 0
    finally:
        stop_all(children)


@click.command("demo")
@click.option(
    "--once",
    is_flag=True,
    default=lambda: os.environ.get("CORTEX_DEMO_ONCE", "") not in ("", "0"),
    help="Exit after the walkthrough (default from CORTEX_DEMO_ONCE=1).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where models, configs, caches and logs go (reused by later runs).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Gateway port (default 31313 when free, else any free port; 0 = any).",
)
def demo(once: bool, data_dir: Path, port: int | None) -> None:
    """Run a two-neuron cortex fleet on this machine and walk through what it does.

    Example: cortex demo --once
    """
    sys.exit(run_demo(data_dir, once, port))


def main() -> None:
    demo()
