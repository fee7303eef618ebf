"""A streaming response that stops when its client leaves, shared by the gateway and the neuron.

Why not Starlette's ``StreamingResponse`` as is: uvicorn speaks ASGI spec 2.3, where ``send``
after a disconnect is silently dropped, so Starlette runs every stream in an anyio task group
beside a disconnect listener -- a cost per stream, and layers every chunk passes through. Here
one plain asyncio task waits for ``http.disconnect`` and cancels the streaming task, whose body
iterator then runs its ``finally`` (the neuron closes the generation, the gateway the neuron
connection): the same guarantee, cheaper (docs/benchmarks.md, sections 1 and 2).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import StreamingResponse


class LastChunk(bytes):
    """The last bytes of a body: sent with ``more_body: False``, so uvicorn writes them and the
    chunked terminator in one socket write instead of two (the same bytes on the wire)."""


class WatchedStreamingResponse(StreamingResponse):
    """Starlette's ``StreamingResponse`` (same status, headers and chunks) that watches for the
    client leaving with one asyncio task. Subclasses give back what the stream holds in
    :meth:`release`, which runs once the stream is over however it ended."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        state = {"finished": False, "client_left": False}

        def on_disconnect(watch: asyncio.Future[None]) -> None:
            if state["finished"] or watch.cancelled() or watch.exception() is not None:
                return
            state["client_left"] = True
            if task is not None:
                task.cancel()

        watch = asyncio.ensure_future(_disconnected(receive))
        watch.add_done_callback(on_disconnect)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            ended = False
            async for chunk in self.body_iterator:
                if type(chunk) is LastChunk:
                    await send(
                        {"type": "http.response.body", "body": bytes(chunk), "more_body": False}
                    )
                    ended = True
                elif not ended:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["client_left"] or task is None:
                raise
            task.uncancel()  # our own cancel: the client left, nothing is wrong
        finally:
            state["finished"] = True
            watch.cancel()
            self.release()

    def release(self) -> None:
        """Give back what the stream holds (nothing here)."""


async def _disconnected(receive: Any) -> None:
    """Return once the client went away (or the answer is complete: uvicorn then also
    reports ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass
