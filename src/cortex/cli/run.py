"""``neuron run [-c neuron.toml] [--listen HOST:PORT]``: the per-node daemon."""

from __future__ import annotations

import sys

import click

from cortex.cli.common import configure_logging, log_format_option
from cortex.config import ConfigError, load_neuron_config


@click.command("run")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="neuron.toml (default: built-in defaults).",
)
@click.option("--listen", default=None, help="HOST:PORT to listen on (overrides the config).")
@click.option(
    "--drain-seconds",
    default=30.0,
    show_default=True,
    help="On SIGTERM, how long in-flight requests may take to finish.",
)
@click.option("--log-level", default="info", show_default=True)
@log_format_option
def run(
    config_path: str | None,
    listen: str | None,
    drain_seconds: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run the node daemon: device workers, model lifecycle and the generation API.

    Example: neuron run -c neuron.toml --listen 0.0.0.0:13131
    """
    configure_logging(log_level, log_format)
    try:
        config = load_neuron_config(config_path)
        if listen is not None:
            from cortex.config import parse_listen

            parse_listen(listen)
    except (ConfigError, ValueError) as exc:
        click.echo(f"neuron: {exc}", err=True)
        sys.exit(2)
    from cortex.neuron.daemon import serve

    try:
        code = serve(config, listen, drain_seconds)
    except ConfigError as exc:
        click.echo(f"neuron: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"neuron: cannot listen: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)
