"""The gateway's one HTTP client to its neurons (polls, admin calls and the proxied requests).

Why a type of its own: an ``aiohttp.ClientSession`` belongs to the event loop it was created on,
and a gateway is built before the loop that serves it runs (tests build one, then serve it on a
thread of its own). Everything else in the gateway is complete when it is built; this is the
one part with a lifecycle, opened by :meth:`Gateway.start` and closed by ``stop``.

One session per process, an unlimited keep-alive pool (docs/gateway.md, "The proxy": chosen by
measurement), idle connections let go before the neuron's keep-alive ends
(``cortex.wire.keepalive``), the cluster token on every request, TLS as ``[neuron_tls]`` says.
"""

from __future__ import annotations

import aiohttp

from cortex.auth import NEURON_TOKEN_HEADER
from cortex.config import CortexConfig
from cortex.wire.keepalive import GATEWAY_UPSTREAM_KEEPALIVE_S
from cortex.wire.tls import client_context


class TransportClosed(RuntimeError):
    """A neuron call before :meth:`Transport.open` (or after ``close``): a programming error."""


class Transport:
    """The shared ``aiohttp.ClientSession`` (see the module docstring)."""

    def __init__(self, config: CortexConfig, neuron_token: str | None) -> None:
        self._config = config
        self._token = neuron_token
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            raise TransportClosed("the gateway is not started: no HTTP session to its neurons")
        return session

    async def open(self) -> None:
        """Create the session on the running event loop (idempotent)."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
            keepalive_timeout=GATEWAY_UPSTREAM_KEEPALIVE_S,  # below the neuron's: it lets go first
            ssl=client_context(self._config.neuron_tls, self._config.base_dir) or True,
        )
        headers = {NEURON_TOKEN_HEADER: self._token} if self._token else None
        # Neurons set no cookies: a dummy jar skips cookie filtering on every request/answer.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
