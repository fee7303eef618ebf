"""``cortex registry serve DIR``: run the HF-compatible registry from the command line."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import click
import uvicorn

from cortex.cli.common import configure_logging
from cortex.config import parse_listen
from cortex.registry.store import RepoStore
from cortex.wire.guard import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_HEADER_BYTES
from cortex.wire.server import GuardedServer, listener_options

log = logging.getLogger("cortex.registry")


@click.group("registry")
def registry() -> None:
    """An HF-compatible model registry (serve a directory of model repos).

    Example: cortex registry serve /srv/models --listen 0.0.0.0:8080
    """


@registry.command("serve")
@click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR"
)
@click.option(
    "--listen",
    default="127.0.0.1:8090",
    show_default=True,
    help="HOST:PORT to bind (port 0 picks a free port; the bound URL is printed).",
)
@click.option(
    "--token-env",
    default=None,
    metavar="NAME",
    help="Require 'Authorization: Bearer <token>', the token read from this env var.",
)
@click.option("--log-level", default="info", show_default=True, help="Log level.")
def serve(directory: Path, listen: str, token_env: str | None, log_level: str) -> None:
    """Serve DIR/<org>/<name>/... (and DIR/<org>/<name>@<rev>/...) over the HF wire format.

    Example: HELEXA_MIRROR_TOKEN=s3cret cortex registry serve /srv/models
    --listen 0.0.0.0:8090 --token-env HELEXA_MIRROR_TOKEN
    """
    from cortex.registry.app import create_app

    configure_logging(log_level)
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise click.UsageError(f"--token-env {token_env}: the variable is unset or empty")
    app = create_app(directory, token=token)
    threading.Thread(
        target=_warm, args=(app.state.registry.store,), name="registry-warm", daemon=True
    ).start()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # the gateway's and the neuron's header limits, with their defaults (docs/registry.md)
        **listener_options(
            header_timeout=DEFAULT_HEADER_TIMEOUT, max_header_bytes=DEFAULT_MAX_HEADER_BYTES
        ),
    )
    asyncio.run(_serve(GuardedServer(config), host, directory, token is not None))


def _warm(store: RepoStore) -> None:
    """Hash everything once in the background; requests meanwhile hash what they need."""
    started = time.monotonic()
    try:
        revisions, files = store.warm()
    except OSError as exc:
        log.warning("indexing %s failed: %s", store.root, exc)
        return
    log.info(
        "indexed %d revision(s), %d file(s) in %.1fs", revisions, files, time.monotonic() - started
    )


async def _serve(server: uvicorn.Server, host: str, directory: Path, auth: bool) -> None:
    """Run uvicorn and print ``listening on http://HOST:PORT`` once the socket is bound."""
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise click.ClickException("the registry failed to start (see the log above)")
        await asyncio.sleep(0.01)
    port = next(s.getsockname()[1] for srv in server.servers for s in srv.sockets)
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"registry serving {directory.resolve()} ({'token required' if auth else 'no auth'})"
    )
    click.echo(f"listening on http://{shown}:{port}", nl=True)
    await task
