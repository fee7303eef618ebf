"""Pieces shared by the ``cortex`` and ``neuron`` command-line programs."""

from __future__ import annotations

import json
from typing import Any

import attrs
import click

from cortex.plugins import get_registry


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Text or JSON lines on stderr, secrets masked (see :mod:`cortex.logging`)."""
    from cortex.logging import configure_logging as configure

    configure(level, log_format)


def log_format_option(command: Any) -> Any:
    """``--log-format text|json`` (JSON: one object per line, for log pipelines)."""
    return click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines as text or as JSON objects (one per line).",
    )(command)


def plugins_command() -> click.Command:
    """``plugins [--json]``: every loaded plugin with version, hooks, what it provides and
    whether it is built in; then every broken plugin with its error."""

    @click.command("plugins")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def plugins(as_json: bool) -> None:
        """List installed plugins: name, version, hooks, what each provides (harnesses,
        sources and their schemes, eviction strategies), built-in or not; and broken plugins
        with their errors.

        Example: cortex plugins --json
        """
        registry = get_registry()
        registry.check_sources()  # a source plugin that cannot create its source is broken
        infos = registry.plugin_infos()
        if as_json:
            payload = {
                "plugins": [attrs.asdict(i) for i in infos],
                "broken": [attrs.asdict(b) for b in registry.broken],
            }
            click.echo(json.dumps(payload, indent=2))
            return
        for info in infos:
            kind = "built-in" if info.builtin else "plugin"
            click.echo(f"{info.name} {info.version} ({kind}): {', '.join(info.hooks)}")
            for what, names in info.provides.items():
                click.echo(f"  {what.replace('_', ' ')}: {', '.join(names)}")
        for broken in registry.broken:
            click.echo(f"{broken.name}: BROKEN: {broken.error}", err=True)

    return plugins


def add_plugin_commands(cli: click.Group, program: str) -> None:
    """Let plugins add their commands; a plugin that fails here is reported broken (by name, in
    ``plugins``), never fatal to the CLI or to the other plugins' commands."""
    get_registry().register_commands(cli, program)
