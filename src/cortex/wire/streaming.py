"""Run a stream translator over an upstream OpenAI SSE byte stream, with keep-alives.

The translators (:class:`cortex.wire.anthropic.AnthropicStreamTranslator`,
:class:`cortex.wire.responses.ResponsesStreamTranslator`) are pure state machines; this is the
loop that feeds them: it decodes SSE frames split anywhere, stops at ``[DONE]`` (or EOF),
turns an upstream exception into the dialect's error event, and sends the translator's ping
while the upstream is quiet (a long prefill or a cold load) so clients and proxies keep the
connection open. No network here: the caller hands in any async iterator of bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from cortex.wire.errors import ApiError
from cortex.wire.sse import SseDecoder

log = logging.getLogger(__name__)


class StreamTranslator(Protocol):
    """What both translators provide."""

    closed: bool

    def start(self) -> list[bytes]: ...
    def feed(self, chunk: dict[str, Any]) -> list[bytes]: ...
    def ping(self) -> list[bytes]: ...
    def finish(self) -> list[bytes]: ...
    def fail(self, error: ApiError) -> list[bytes]: ...


async def translate_sse(
    upstream: AsyncIterator[bytes],
    translator: StreamTranslator,
    *,
    ping_interval: float = 10.0,
    on_chunk: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the client's bytes for an upstream OpenAI chunk stream.

    ``on_chunk`` sees every decoded upstream chunk (usage for metrics, first-token timing).
    The upstream read is never cancelled by a ping: one pending read is awaited across pings.
    """
    # No eager translator.start(): the first upstream chunk (the neuron sends it with the
    # answer's headers) carries the prompt's length, which Anthropic's message_start reports.
    # A quiet upstream still starts the stream at once: ping() starts it first.
    decoder = SseDecoder()
    iterator = upstream.__aiter__()
    pending: asyncio.Future[bytes] | None = None
    try:
        while not translator.closed:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=ping_interval)
            if not done:
                for frame in translator.ping():
                    yield frame
                continue
            read, pending = pending, None
            try:
                data = read.result()
            except StopAsyncIteration:
                break
            except ApiError as failed:
                for frame in translator.fail(failed):
                    yield frame
                return
            except Exception as exc:  # a broken upstream connection, an idle timeout
                log.warning("upstream stream failed: %r", exc)
                broken = ApiError(
                    502, "upstream_error", f"the upstream stream failed ({type(exc).__name__})"
                )
                for frame in translator.fail(broken):
                    yield frame
                return
            for _event, text in decoder.feed(data):
                if text.strip() == "[DONE]":
                    for frame in translator.finish():
                        yield frame
                    return
                try:
                    chunk = json.loads(text)
                except ValueError:
                    log.warning("upstream sent a frame that is not JSON: %.200s", text)
                    continue
                if on_chunk is not None and isinstance(chunk, dict):
                    on_chunk(chunk)
                for frame in translator.feed(chunk):
                    yield frame
        for frame in translator.finish():
            yield frame
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


__all__ = ["StreamTranslator", "translate_sse"]
