"""The demo's config files, written to ``<data>/config`` and printed, so an operator sees exactly
what a two-node fleet needs and can copy it.

Ports are picked free before anything starts and written into the files, so what is printed is
what runs (a port 0 in a printed config would teach nothing).
"""

from __future__ import annotations

import socket
from pathlib import Path

import attrs

from cortex.demo.models import AGENT_MEMORY_MB, ECHO_MEMORY_MB, DemoModels

ALPHA, BETA = "alpha", "beta"
ALPHA_MEMORY_MB = 1024
# Two echo models (2 x 100 MB) fit, a third needs one of them gone.
BETA_MEMORY_MB = 250
PREFERRED_GATEWAY_PORT = 31313
# Bare ids name this scheme; the neurons' huggingface source points at the local registry.
NO_TOKEN_ENV = "CORTEX_DEMO_NO_TOKEN"


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free on loopback, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


@attrs.frozen
class Ports:
    registry: int
    alpha: int
    beta: int
    gateway: int
    metrics: int

    @classmethod
    def pick(cls, gateway: int | None) -> Ports:
        return cls(
            registry=free_port(),
            alpha=free_port(),
            beta=free_port(),
            gateway=free_port(PREFERRED_GATEWAY_PORT) if gateway is None else free_port(gateway),
            metrics=free_port(),
        )


@attrs.frozen
class DemoConfigs:
    """Paths of the written files (``files`` keeps print order)."""

    directory: Path
    files: dict[str, Path]

    def path(self, name: str) -> Path:
        return self.files[name]


def neuron_toml(name: str, port: int, registry_url: str, cache: Path, memory_mb: int) -> str:
    return f"""\
# neuron {name}: one per machine. `neuron run -c {name}.toml`
name = "{name}"
listen = "127.0.0.1:{port}"
default_source = "huggingface"

# The huggingface source, pointed at the demo's local registry instead of huggingface.co.
[sources.huggingface]
endpoint = "{registry_url}"
auth_env = "{NO_TOKEN_ENV}"   # the name of the env var holding a token (none here)
cache_dir = "{cache}"

# The CPU device's memory budget: what loads (and evictions) are planned against.
[devices."cpu"]
memory_mb = {memory_mb}
"""


def models_toml(models: DemoModels) -> str:
    lines = ["# What the gateway may load, where, and how it treats each model."]
    if models.torch_model:
        lines += [
            "",
            "[[models]]",
            f'id = "{models.torch_model}"',
            'harness = "torch"',
            f'nodes = ["{ALPHA}"]',
        ]
    if models.gguf_model:
        lines += [
            "",
            "[[models]]",
            f'id = "{models.gguf_model}"',
            'harness = "llamacpp"',
            'quant = "F16"',
            f'nodes = ["{ALPHA}"]',
        ]
    for repo in models.echo_models:
        lines += [
            "",
            "[[models]]",
            f'id = "{repo}"',
            f"memory_mb = {ECHO_MEMORY_MB}",
            f'nodes = ["{BETA}"]',
            'keep_alive = "30m"',
        ]
    if models.agent_model:
        lines += [
            "",
            "# For coding agents (Claude Code, Codex): an echo model with a 256k-token context.",
            "[[models]]",
            f'id = "{models.agent_model}"',
            f"memory_mb = {AGENT_MEMORY_MB}",
            f'nodes = ["{ALPHA}"]',
            'keep_alive = "30m"',
        ]
    lines += ["", "[aliases]"]
    if models.torch_model:
        lines.append(f'"tiny" = "{models.torch_model}"')
    lines.append(f'"echo" = "{models.echo_models[0]}"')
    if models.agent_model:
        lines.append(f'"agent" = "{models.agent_model}"')
    return "\n".join(lines) + "\n"


def cortex_toml(ports: Ports) -> str:
    return f"""\
# The gateway. `cortex serve -c cortex.toml`
models_config = "models.toml"

[gateway]
listen = "127.0.0.1:{ports.gateway}"
metrics_listen = "127.0.0.1:{ports.metrics}"
poll_interval = "1s"
# The fleet dashboard at /ui: no keys on this loopback demo, so its buttons work for anyone here.
dashboard = "admin"

[eviction]
strategy = "lru"

[[neurons]]
name = "{ALPHA}"
endpoint = "http://127.0.0.1:{ports.alpha}"

[[neurons]]
name = "{BETA}"
endpoint = "http://127.0.0.1:{ports.beta}"
"""


def write_configs(data_dir: Path, ports: Ports, models: DemoModels) -> DemoConfigs:
    """Write the four files; each is loaded back through the strict config loaders, so a demo
    config can never drift from what the programs accept."""
    from cortex.config import load_cortex_config, load_models_config, load_neuron_config

    directory = data_dir / "config"
    directory.mkdir(parents=True, exist_ok=True)
    registry_url = f"http://127.0.0.1:{ports.registry}"
    texts = {
        f"{ALPHA}.toml": neuron_toml(
            ALPHA, ports.alpha, registry_url, data_dir / "cache" / ALPHA, ALPHA_MEMORY_MB
        ),
        f"{BETA}.toml": neuron_toml(
            BETA, ports.beta, registry_url, data_dir / "cache" / BETA, BETA_MEMORY_MB
        ),
        "models.toml": models_toml(models),
        "cortex.toml": cortex_toml(ports),
    }
    files = {}
    for name, text in texts.items():
        path = directory / name
        path.write_text(text)
        files[name] = path
    load_neuron_config(files[f"{ALPHA}.toml"])
    load_neuron_config(files[f"{BETA}.toml"])
    load_models_config(files["models.toml"])
    load_cortex_config(files["cortex.toml"])
    return DemoConfigs(directory=directory, files=files)
