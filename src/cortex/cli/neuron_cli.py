"""``neuron``: the per-node daemon and its tools."""

from __future__ import annotations

import click

from cortex import __version__
from cortex.cli.common import add_plugin_commands, plugins_command
from cortex.cli.pull import pull
from cortex.cli.run import run
from cortex.cli.status import neuron_status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neuron")
def cli() -> None:
    """neuron: runs models on this machine's devices and serves them to a cortex gateway."""


cli.add_command(plugins_command())
cli.add_command(pull)
cli.add_command(run)
cli.add_command(neuron_status)


def main() -> None:
    add_plugin_commands(cli, "neuron")
    cli()
