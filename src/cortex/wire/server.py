"""The uvicorn options every cortex listener shares: header limits and TLS.

``cortex serve`` (API and metrics ports), ``neuron run`` and ``cortex registry serve`` build
their ``uvicorn.Config`` with :func:`listener_options` and run it with :class:`GuardedServer`,
so a limit or a certificate option cannot be forgotten on one of them. :func:`check_server_tls`
reads the certificate files before anything starts, so a bad file is a one-line config error
naming the key and the file, not uvicorn's traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
from pathlib import Path
from typing import Any

import uvicorn

from cortex.config import ConfigError, ServerTls
from cortex.wire.guard import guarded_protocol


def config_path(value: str, base_dir: Path) -> str:
    """A path from a config file: ``~`` expanded, relative to the file's folder."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def listener_options(
    *,
    header_timeout: float,
    max_header_bytes: int,
    tls: ServerTls | None = None,
    base_dir: Path = Path("."),
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: the guarded HTTP protocol
    (:mod:`cortex.wire.guard`) and, when ``tls`` is on, uvicorn's certificate options."""
    options: dict[str, Any] = {"http": guarded_protocol(header_timeout, max_header_bytes)}
    if tls is not None and tls.enabled:
        assert tls.certfile is not None and tls.keyfile is not None
        options["ssl_certfile"] = config_path(tls.certfile, base_dir)
        options["ssl_keyfile"] = config_path(tls.keyfile, base_dir)
        if tls.client_ca_file is not None:
            options["ssl_ca_certs"] = config_path(tls.client_ca_file, base_dir)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def check_server_tls(tls: ServerTls | None, base_dir: Path, section: str) -> None:
    """Load ``tls``'s files the way uvicorn will, now: a missing, unreadable or malformed file,
    a certificate that does not match its key, or an encrypted key raises :class:`ConfigError`
    naming ``section``, the key and the file. Why: uvicorn loads them inside ``serve()``, and
    its exception (a traceback ending in ``[Errno 2] No such file or directory``) named neither.

    Encrypted keys are not supported (uvicorn's ``ssl_keyfile_password`` is not exposed):
    OpenSSL would prompt on the terminal for a pass phrase. The check loads the key with a
    password callback that refuses, so an encrypted key fails here with a clear message.
    """
    if tls is None or not tls.enabled:
        return
    assert tls.certfile is not None and tls.keyfile is not None
    certfile = config_path(tls.certfile, base_dir)
    keyfile = config_path(tls.keyfile, base_dir)
    encrypted = False

    def password() -> str:
        nonlocal encrypted
        encrypted = True
        raise ValueError("encrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"{section} {key}: no such file: {path}")
    try:
        context.load_cert_chain(certfile, keyfile, password=password)
    except (OSError, ssl.SSLError, ValueError) as exc:
        if encrypted:
            raise ConfigError(
                f"{section} keyfile: {keyfile} is encrypted (has a pass phrase); cortex needs "
                "an unencrypted key (docs/security.md)"
            ) from None
        raise ConfigError(
            f"{section} certfile/keyfile: cannot use {certfile} with {keyfile} (not PEM, or "
            f"the certificate does not match the key): {exc}"
        ) from None
    if tls.client_ca_file is not None:
        ca_file = config_path(tls.client_ca_file, base_dir)
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{section} client_ca_file: cannot use {ca_file} as a CA bundle: {exc}"
            ) from None


# The TLS handshake bound of the server starting in this task (see GuardedServer.startup).
_handshake_timeout: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "cortex_handshake_timeout", default=None
)


def _bound_tls_handshakes(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop.create_server`` pass ``ssl_handshake_timeout`` from :data:`_handshake_timeout`
    when a TLS listener is created with it set (once per loop; otherwise a pass-through).

    Why: uvicorn calls ``loop.create_server(..., ssl=...)`` with no handshake timeout, so the
    loop's default (60 s) applied, and the header timeout only starts once the handshake is
    done: a client that sent nothing, or half a ClientHello, held an HTTPS connection 60 s.
    uvicorn offers no option for it; wrapping the loop's method during ``startup`` is the
    smallest hook (copying uvicorn's ``startup`` would be a worse coupling).
    """
    if getattr(loop, "_cortex_bounded_handshakes", False):
        return
    original = loop.create_server

    async def create_server(*args: Any, **kwargs: Any) -> Any:
        timeout = _handshake_timeout.get()
        if timeout is not None and kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", timeout)
        return await original(*args, **kwargs)

    loop.create_server = create_server  # type: ignore[method-assign]
    loop._cortex_bounded_handshakes = True  # type: ignore[attr-defined]


class GuardedServer(uvicorn.Server):
    """uvicorn's server whose TLS handshake is bounded by the header timeout of the guarded
    protocol (:mod:`cortex.wire.guard`): one bound for "connected, but no request yet",
    whether the port speaks HTTP or HTTPS."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        timeout = getattr(self.config.http, "header_timeout", None)
        if timeout is not None:
            _bound_tls_handshakes(asyncio.get_running_loop())
            _handshake_timeout.set(float(timeout))
        await super().startup(sockets)


def scheme(tls: ServerTls | None) -> str:
    return "https" if tls is not None and tls.enabled else "http"
