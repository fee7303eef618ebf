"""``cortex``: the gateway and the operator's tools."""

from __future__ import annotations

import click

from cortex import __version__
from cortex.cli.admin import load, models, unload
from cortex.cli.common import add_plugin_commands, plugins_command
from cortex.cli.keys import keys
from cortex.cli.plugin_new import plugin_group
from cortex.cli.serve import serve
from cortex.cli.status import status
from cortex.cli.usage import usage
from cortex.demo.main import demo
from cortex.registry.cli import registry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cortex")
def cli() -> None:
    """cortex: one OpenAI- and Anthropic-compatible endpoint in front of a fleet of neurons."""


cli.add_command(plugins_command())
cli.add_command(serve)
cli.add_command(demo)
cli.add_command(registry)
cli.add_command(plugin_group)
cli.add_command(keys)
cli.add_command(status)
cli.add_command(usage)
cli.add_command(models)
cli.add_command(load)
cli.add_command(unload)


def main() -> None:
    add_plugin_commands(cli, "cortex")
    cli()
