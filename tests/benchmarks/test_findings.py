"""Regression tests for problems the benchmarks found (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import socket

from cortex.neuron.daemon import bind


def test_neuron_connections_get_tcp_nodelay() -> None:
    """The neuron binds its own socket; asyncio only sets TCP_NODELAY on accepted connections
    when the listening socket's proto is TCP. Without it, keep-alive requests waited ~45 ms for
    the client's delayed ACK (Nagle held the body behind the headers)."""

    async def check() -> int:
        sock = bind("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("socket")
            accepted.set_result(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        port = sock.getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(check()) != 0
