"""``neuron run``: build the node, bind the listener, serve, and shut down cleanly.

Start-up order matters to an operator: the socket is bound and ``listening on http://H:P`` is
printed before any model loads, so ``/health`` answers at once and reports the progress of the
``[[default_models]]``, which load in the background. SIGTERM (or Ctrl-C): ``/health`` says
``draining``, new connections are refused, in-flight requests get up to ``drain_seconds`` to
finish, every model is unloaded on its worker, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from cortex.auth import NeuronTokenMiddleware, is_loopback, read_token
from cortex.config import NeuronConfig, parse_listen
from cortex.neuron.api import create_app
from cortex.neuron.loader import Loader, LoadRequest
from cortex.neuron.node import Node
from cortex.plugins import get_registry
from cortex.request_schemas import document_request_bodies
from cortex.source_resolver import SourceResolver
from cortex.wire.errors import ApiError
from cortex.wire.keepalive import NEURON_KEEPALIVE_S
from cortex.wire.limits import BodyLimitMiddleware
from cortex.wire.server import GuardedServer, check_server_tls, listener_options, scheme

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30.0


def build_node(config: NeuronConfig) -> Node:
    """Plugins, sources, devices and one worker per device, from the config."""
    registry = get_registry()
    resolver = SourceResolver.from_config(config, registry.source_plugins())
    return Node.build(config, registry.harnesses(), registry.devices(), resolver)


async def load_default_models(node: Node, loader: Loader) -> None:
    """Load ``[[default_models]]`` one after another; failures are logged and counted."""
    for model in node.config.default_models:
        request = LoadRequest(
            model_id=model.id, harness=model.harness, quant=model.quant, device=model.device
        )
        try:
            await loader.load(request)
            node.default_models.ready += 1
            log.info("default model %s is ready", model.id)
        except ApiError as exc:
            node.default_models.failed += 1
            log.error("default model %s failed to load: %s", model.id, exc.message)
        except Exception:
            node.default_models.failed += 1
            log.exception("default model %s failed to load", model.id)


def make_app(node: Node, drain_seconds: float = DRAIN_SECONDS) -> FastAPI:
    loader = Loader(node)
    node.default_models.total = len(node.config.default_models)

    node.drain_seconds = drain_seconds

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        node.loop = asyncio.get_running_loop()  # a device fault restarts from here
        task = asyncio.create_task(load_default_models(node, loader))
        node.started = True
        try:
            yield
        finally:
            node.draining = True
            task.cancel()
            await loader.unload_all(wait_seconds=min(5.0, drain_seconds))
            node.workers.stop()
            log.info("neuron stopped")

    app = create_app(node, loader, lifespan=lifespan)
    install_guards(app, node.config)
    document_request_bodies(app)
    return app


def install_guards(app: FastAPI, config: NeuronConfig) -> None:
    """The body size limit, and the shared token when ``token_env`` is set (docs/security.md).
    The token guard is outermost: an unauthenticated caller never gets a body read."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    token = read_token(config.token_env, os.environ, "neuron.toml token_env")
    if token is not None:
        app.add_middleware(NeuronTokenMiddleware, token=token)


class DrainingServer(GuardedServer):
    """uvicorn, but ``/health`` says ``draining`` from the moment a signal arrives, and a
    graceful SIGTERM ends the process with exit code 0 (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.node.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests
        else:
            self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and accepted connections inherit it. Without it Nagle held each response's body behind its
    # headers until the client's delayed ACK: every keep-alive request took ~45 ms (benchmarks).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def warn_if_exposed(host: str, config: NeuronConfig) -> bool:
    """A loud warning when a non-loopback listener has no cluster token (``token_env``): anyone
    who can reach the port can load and unload models, generate, and read ``/discovery``.
    The gateway warns the same way when its auth is off. True when it warned."""
    if is_loopback(host) or config.token_env is not None:
        return False
    banner = "!" * 78
    log.warning(
        "\n%s\nNO CLUSTER TOKEN on a non-loopback listener (%s): anyone who can reach this port "
        "can\nload, unload and use models. Set token_env in neuron.toml (docs/security.md).\n%s",
        banner,
        host,
        banner,
    )
    return True


def serve(config: NeuronConfig, listen: str | None, drain_seconds: float = DRAIN_SECONDS) -> int:
    host, port = parse_listen(listen or config.listen)
    # Certificate files are read now: a bad one is a config error naming the key and the file,
    # before anything is built or "listening on https://..." is printed.
    check_server_tls(config.tls, config.base_dir, "neuron.toml [tls]")
    node = build_node(config)
    app = make_app(node, drain_seconds)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=int(drain_seconds),
        timeout_keep_alive=NEURON_KEEPALIVE_S,  # past the gateway pool's: cortex.wire.keepalive
        lifespan="on",
        access_log=False,
        log_config=None,  # keep the handlers `neuron run` configured (text or JSON)
        # header limits and TLS (docs/security.md)
        **listener_options(
            header_timeout=config.header_timeout.seconds or 10.0,
            max_header_bytes=config.max_header_bytes,
            tls=config.tls,
            base_dir=config.base_dir,
        ),
    )
    server = DrainingServer(uv_config, node)
    # A device fault with on_device_fault = "exit": stop like SIGTERM, exit non-zero.
    node.request_exit = lambda: server.handle_exit(signal.SIGTERM, None)
    warn_if_exposed(bound_host, config)  # before "listening on": a test reads up to that line
    devices = ", ".join(node.devices)
    harnesses = ", ".join(node.harnesses) or "none"
    print(f"neuron {node.name}: devices {devices}; harnesses {harnesses}", flush=True)
    print(f"listening on {scheme(config.tls)}://{shown}:{bound_port}", flush=True)
    server.run(sockets=[sock])
    sys.stdout.flush()
    return node.exit_code or 0
