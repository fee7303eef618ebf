"""The Anthropic Messages and OpenAI Responses routes: translate, route, relay, translate back.

Neurons speak OpenAI chat completions only. A ``/v1/messages`` or ``/v1/responses`` request is
translated into a chat request by the pure translators in :mod:`cortex.wire` (C's modules),
routed exactly like a chat request (aliases, cold loads, least busy replica), and the answer is
translated back: whole, or chunk by chunk as it streams (never buffered). A neuron's error keeps
its status, code, message and Retry-After, rendered in the route's envelope.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from starlette.responses import JSONResponse, Response

from cortex.gateway.neuron_client import retry_after_of
from cortex.gateway.proxy import StreamObserver, UpstreamStreamingResponse, open_upstream
from cortex.gateway.stream_probe import chunk_has_content
from cortex.wire.errors import ApiError
from cortex.wire.streaming import StreamTranslator, translate_sse

WholeTranslator = Callable[[dict[str, Any]], dict[str, Any]]
TranslatorFactory = Callable[[], StreamTranslator]


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in resp.content.iter_any():
        yield chunk


async def relay_translated(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    client_headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    observer: StreamObserver,
    extra_headers: Mapping[str, str],
    retry_after: float,
    whole: WholeTranslator,
    stream: TranslatorFactory | None,
) -> Response:
    """POST a chat request to a neuron and answer in the client's dialect.

    Like :func:`cortex.gateway.proxy.forward`: failures before the answer headers raise
    :class:`cortex.gateway.proxy.UpstreamUnreachable` (the caller may try another replica) and
    ``observer.on_end`` is called exactly once after that."""
    resp = await open_upstream(session, url, body, client_headers, timeout, retry_after)
    if resp.status != 200:
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            resp.close()
        observer.on_end(f"upstream_{resp.status}")
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        error = ApiError.from_openai_body(resp.status, payload, retry_after_of(resp.headers))
        if error.status >= 500 and error.retry_after is None:
            error.retry_after = retry_after
        raise error

    if stream is not None and resp.headers.get("content-type", "").startswith("text/event-stream"):
        return UpstreamStreamingResponse(
            _translated_stream(resp, stream(), observer),
            resp,
            observer,
            media_type="text/event-stream",
            headers={**extra_headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    try:
        raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        observer.on_end("upstream_connection_error")
        raise ApiError(
            504 if isinstance(exc, TimeoutError) else 502,
            "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_connection_error",
            f"the neuron's answer did not arrive whole ({type(exc).__name__})",
            retry_after=retry_after,
        ) from None
    finally:
        resp.close()
    try:
        completion = json.loads(raw)
    except ValueError:
        observer.on_end("upstream_bad_answer")
        raise ApiError(
            502, "upstream_bad_answer", "the neuron answered something that is not JSON"
        ) from None
    usage = completion.get("usage") if isinstance(completion, dict) else None
    if isinstance(usage, dict):
        observer.on_usage(usage)
    observer.on_end(None)
    return JSONResponse(whole(completion), headers=dict(extra_headers))


async def _translated_stream(
    resp: aiohttp.ClientResponse, translator: StreamTranslator, observer: StreamObserver
) -> AsyncIterator[bytes]:
    waiting_for_token = True

    def on_chunk(chunk: dict[str, Any]) -> None:
        nonlocal waiting_for_token
        if waiting_for_token and chunk_has_content(chunk):
            waiting_for_token = False
            observer.on_first_token()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            observer.on_usage(usage)

    error: str | None = None
    try:
        async for frame in translate_sse(_chunks(resp), translator, on_chunk=on_chunk):
            yield frame
    except BaseException:
        error = "client_disconnected"
        raise
    finally:
        resp.close()  # a client that went away closes the neuron's request too
        observer.on_end(error)
