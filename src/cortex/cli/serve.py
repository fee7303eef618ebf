"""``cortex serve``: run the gateway (API on ``listen``, Prometheus on ``metrics_listen``).

This module and everything it imports stay free of torch, transformers, llama_cpp and
huggingface_hub: a gateway host installs ``cortex`` alone (a test checks ``sys.modules``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import attrs
import click
import uvicorn

from cortex.cli.common import configure_logging, log_format_option
from cortex.config import (
    ConfigError,
    CortexConfig,
    ModelsConfig,
    NeuronRef,
    load_cortex_config,
    load_models_config,
    parse_listen,
)
from cortex.wire.server import GuardedServer, check_server_tls, listener_options, scheme
from cortex.wire.tls import client_context

DEFAULT_CONFIG = "cortex.toml"


def load_configs(config_path: str | None) -> tuple[CortexConfig, ModelsConfig]:
    """``cortex.toml`` (explicit, else ``./cortex.toml`` when present, else defaults) and the
    ``models.toml`` it names (a missing *default* models file is an empty catalogue)."""
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    config = load_cortex_config(config_path)
    models_path = config.models_config_path
    if not models_path.is_file() and config.models_config == CortexConfig().models_config:
        return config, ModelsConfig()
    return config, load_models_config(models_path)


def _with_overrides(
    config: CortexConfig, listen: str | None, metrics_listen: str | None, neurons: tuple[str, ...]
) -> CortexConfig:
    gateway = config.gateway
    if listen is not None:
        gateway = attrs.evolve(gateway, listen=listen)
    if metrics_listen is not None:
        gateway = attrs.evolve(gateway, metrics_listen=metrics_listen)
    extra = []
    for spec in neurons:
        name, sep, endpoint = spec.partition("=")
        if not sep or not name or not endpoint.startswith(("http://", "https://")):
            raise click.BadParameter(
                f"expected NAME=http://HOST:PORT, got {spec!r}", param_hint="--neuron"
            )
        extra.append(NeuronRef(name=name, endpoint=endpoint))
    return attrs.evolve(config, gateway=gateway, neurons=[*config.neurons, *extra])


def _bound_port(server: uvicorn.Server) -> int:
    return next(s.getsockname()[1] for srv in server.servers for s in srv.sockets)


def _stop_all(*servers: uvicorn.Server) -> None:
    for server in servers:
        server.should_exit = True


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (a dependency on CPython/POSIX), else asyncio's.

    Why: the gateway's per-request and per-chunk cost is mostly event-loop and protocol work
    (docs/benchmarks.md); uvloop halves the loop's share. ``asyncio.run`` alone would never use
    it (uvicorn only picks its loop when it runs the loop itself), hence the explicit factory.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _serve(config: CortexConfig, models: ModelsConfig, log_level: str) -> None:
    from prometheus_client import make_asgi_app

    from cortex.auth import GatewayAuth, MetricsTokenMiddleware, read_token, warn_if_exposed
    from cortex.gateway.app import create_app
    from cortex.gateway.metrics import GatewayMetrics
    from cortex.gateway.service import Gateway, load_strategy

    try:
        strategy = load_strategy(config.eviction.strategy)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    metrics = GatewayMetrics()
    try:
        gateway = Gateway(config, models, strategy, metrics)
        auth = GatewayAuth.from_config(config.auth, config.base_dir)
        metrics_token = read_token(
            config.auth.metrics_token_env, os.environ, "[auth] metrics_token_env"
        )
        client_context(config.neuron_tls, config.base_dir)  # unreadable files: fail now
        check_server_tls(config.gateway.tls, config.base_dir, "[gateway.tls]")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    g = config.gateway
    host, port = parse_listen(g.listen)
    m_host, m_port = parse_listen(g.metrics_listen)
    warn_if_exposed(host, auth, m_host, metrics_token is not None)
    # Header limits and TLS (docs/security.md) on both listeners.
    listener = listener_options(
        header_timeout=g.header_timeout.seconds or 10.0,
        max_header_bytes=g.max_header_bytes,
        tls=g.tls,
        base_dir=config.base_dir,
    )
    api = GuardedServer(
        uvicorn.Config(
            create_app(gateway, auth),
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            log_config=None,  # keep cortex's handlers (text or JSON, secrets masked)
            # cortex never reads the client address, and uvicorn's X-Forwarded-For middleware
            # wrapped every request (docs/benchmarks.md)
            proxy_headers=False,
            **listener,
        )
    )
    metrics_app = make_asgi_app(registry=metrics.registry)
    if metrics_token is not None:
        metrics_app = MetricsTokenMiddleware(metrics_app, metrics_token)
    metrics_server = GuardedServer(
        uvicorn.Config(
            metrics_app,
            host=m_host,
            port=m_port,
            log_level=log_level,
            access_log=False,
            log_config=None,
            lifespan="off",
            **listener,
        )
    )
    # One handler for both servers, and a clean exit (status 0) on SIGTERM/SIGINT: uvicorn's
    # own handlers would re-raise the signal after shutdown.
    loop = asyncio.get_running_loop()
    for server in (api, metrics_server):
        server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_all, api, metrics_server)
    metrics_task = asyncio.create_task(metrics_server.serve())
    api_task = asyncio.create_task(api.serve())
    while not (api.started and metrics_server.started):
        for task in (api_task, metrics_task):
            if task.done():
                await task
                raise click.ClickException("the gateway failed to start (see the log above)")
        await asyncio.sleep(0.01)
    web = scheme(g.tls)
    click.echo(f"metrics on {web}://{_shown(m_host)}:{_bound_port(metrics_server)}/metrics")
    click.echo(f"listening on {web}://{_shown(host)}:{_bound_port(api)}")
    await api_task
    metrics_server.should_exit = True
    await metrics_task


@click.command("serve")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="cortex.toml (default: ./cortex.toml when present).",
)
@click.option("--listen", default=None, help="HOST:PORT for the API (overrides the config).")
@click.option("--metrics-listen", default=None, help="HOST:PORT for Prometheus metrics.")
@click.option(
    "--neuron",
    "neurons",
    multiple=True,
    metavar="NAME=URL",
    help="Add a neuron (repeatable), e.g. --neuron big=http://10.0.0.11:13131.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@log_format_option
def serve(
    config_path: str | None,
    listen: str | None,
    metrics_listen: str | None,
    neurons: tuple[str, ...],
    log_level: str,
    log_format: str,
) -> None:
    """Run the gateway: one OpenAI-compatible endpoint in front of the configured neurons.

    Example: cortex serve -c cortex.toml --listen 0.0.0.0:31313
    """
    configure_logging(log_level, log_format)
    for flag, value in (("--listen", listen), ("--metrics-listen", metrics_listen)):
        if value is not None:
            try:
                parse_listen(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=flag) from None
    try:
        config, models = load_configs(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    config = _with_overrides(config, listen, metrics_listen, neurons)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_serve(config, models, log_level))
