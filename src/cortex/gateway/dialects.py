"""The Anthropic Messages and OpenAI Responses routes: translate, route, relay, translate back.

Neurons speak OpenAI chat completions only. A ``/v1/messages`` or ``/v1/responses`` request is
translated into a chat request by the pure translators in :mod:`cortex.wire` (C's modules),
routed exactly like a chat request by :meth:`cortex.gateway.service.Gateway.translated` (aliases,
admission, cold loads, least busy replica, metrics), and the answer is translated back: whole,
or chunk by chunk as it streams (never buffered). A neuron's error keeps its status, code,
message and Retry-After, rendered in the route's envelope.

Streams keep the client's connection alive from the first moment: when no answer headers came
back within one keep-alive interval (a cold load, a queue, a long prefill), the stream starts
anyway with ``message_start`` / ``response.created`` and pings, and an error that arrives later
becomes the dialect's ``error`` event. Errors that are known at once keep their HTTP status.

Translated requests carry the ``cortex.clamp_max_tokens`` extension (docs/clients.md): Claude
Code asks for ``max_tokens: 32000`` whatever the model, and Anthropic treats max_tokens as a
ceiling, so the neuron clamps the budget to the context left instead of answering 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cortex.gateway.neuron_client import retry_after_of
from cortex.gateway.proxy import StreamObserver, UpstreamStreamingResponse, open_upstream
from cortex.gateway.redact import public
from cortex.gateway.stream_probe import chunk_has_content
from cortex.wire import anthropic, responses
from cortex.wire.errors import ApiError
from cortex.wire.http import read_json_object
from cortex.wire.streaming import StreamTranslator, translate_sse

if TYPE_CHECKING:
    from cortex.gateway.service import Gateway

log = logging.getLogger(__name__)

# The neuron request extension every translated request carries (docs/clients.md): the
# max_tokens clamp, and the prompt's length on the first chunk (message_start's usage).
CLAMP_EXTENSION = {"clamp_max_tokens": True, "report_prompt_tokens": True}
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# Names the tools dropped under ``[gateway] hosted_tools = "drop"`` (their types).
DROPPED_TOOLS_HEADER = "x-cortex-dropped-tools"
_warned_dropped: set[tuple[str, str]] = set()


def dropped_tools_headers(route: str, dropped: tuple[str, ...]) -> dict[str, str]:
    """The response header naming dropped hosted tools, logged too: a warning the first time a
    route drops a tool type (Codex sends web_search on every request), then at debug."""
    if not dropped:
        return {}
    kinds = list(dict.fromkeys(dropped))
    for kind in kinds:
        key = (route, kind)
        if key not in _warned_dropped and len(_warned_dropped) < 1024:
            _warned_dropped.add(key)
            log.warning(
                "%s: dropped the hosted tool %r (the fleet cannot run it; "
                "[gateway] hosted_tools = 'refuse' answers 400 instead); said in the %s header",
                route,
                kind[:64],
                DROPPED_TOOLS_HEADER,
            )
        else:
            log.debug("%s: dropped the hosted tool %r", route, kind[:64])
    value = ",".join(kind[:64] for kind in kinds)
    return {DROPPED_TOOLS_HEADER: value.encode("ascii", "replace").decode("ascii")}


WholeTranslator = Callable[[dict[str, Any]], dict[str, Any]]
# A dialect route's work once its JSON body is read: (gateway, route, payload, headers).
DialectAnswer = Callable[["Gateway", str, dict[str, Any], Mapping[str, str]], Awaitable[Response]]
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
    ping_interval: float = 10.0,
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
        raise public(error)  # no paths or addresses to clients (docs/security.md)

    if stream is not None and resp.headers.get("content-type", "").startswith("text/event-stream"):
        return TranslatedStream(
            _translated_stream(resp, stream(), observer, ping_interval),
            resp,
            observer,
            media_type="text/event-stream",
            headers={**extra_headers, **STREAM_HEADERS},
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


class TranslatedStream(UpstreamStreamingResponse):
    """A translated answer stream; :meth:`release` (inherited) gives its upstream back when the
    stream is relayed inside another one (:func:`_kept_alive`) and the client left before it
    began."""


async def _translated_stream(
    resp: aiohttp.ClientResponse,
    translator: StreamTranslator,
    observer: StreamObserver,
    ping_interval: float,
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
        async for frame in translate_sse(
            _chunks(resp), translator, ping_interval=ping_interval, on_chunk=on_chunk
        ):
            yield frame
    except BaseException:
        error = "client_disconnected"
        raise
    finally:
        resp.close()  # a client that went away closes the neuron's request too
        observer.on_end(error)


# ---- the routes ---------------------------------------------------------------------------


async def serve_translated(
    gateway: Gateway,
    route: str,
    headers: Mapping[str, str],
    model: str,
    chat: dict[str, Any],
    whole: WholeTranslator,
    stream: TranslatorFactory | None,
    dropped: tuple[str, ...] = (),
) -> Response:
    """Route a translated chat body; a stream that is slow to start is kept alive by pings.
    ``dropped``: hosted tools the request named and cortex left out (said in a header)."""
    chat = {**chat, "cortex": CLAMP_EXTENSION}
    extra = dropped_tools_headers(route, dropped)
    if stream is None:
        return _with_headers(
            await gateway.translated(route, model, chat, headers, whole, None), extra
        )
    translator = stream()  # one translator for the waiting phase and the relayed stream
    interval = gateway.config.gateway.stream_keepalive.seconds or 10.0
    answer = asyncio.ensure_future(
        gateway.translated(route, model, chat, headers, whole, lambda: translator)
    )
    try:
        await asyncio.wait_for(asyncio.shield(answer), interval)
    except TimeoutError:

        def record(error: ApiError) -> None:
            gateway.record_failure(route, model, error)

        return StreamingResponse(
            _kept_alive(answer, translator, interval, record),
            media_type="text/event-stream",
            headers={**STREAM_HEADERS, **extra},
        )
    except BaseException:
        if not answer.done():  # the client went away: stop routing / waiting for it
            answer.cancel()
        raise
    return _with_headers(answer.result(), extra)


def _with_headers(response: Response, extra: Mapping[str, str]) -> Response:
    for name, value in extra.items():
        response.headers[name] = value
    return response


async def _kept_alive(
    answer: asyncio.Future[Response],
    translator: StreamTranslator,
    interval: float,
    record: Callable[[ApiError], None],
) -> AsyncIterator[bytes]:
    """Ping while the routed answer is not there yet, then relay its translated stream.
    ``record`` counts an error that came too late for an HTTP status (metrics, request log)."""
    relayed: Response | None = None
    started = False
    try:
        for frame in translator.ping():
            yield frame
        while True:
            done, _ = await asyncio.wait({answer}, timeout=interval)
            if done:
                break
            for frame in translator.ping():
                yield frame
        try:
            relayed = answer.result()
        except ApiError as error:
            record(error)
            for frame in translator.fail(error):
                yield frame
            return
        except Exception as exc:
            log.exception("routing a kept-alive stream failed")
            error = ApiError(500, "internal_error", f"internal error ({type(exc).__name__})")
            record(error)
            for frame in translator.fail(error):
                yield frame
            return
        if not isinstance(relayed, StreamingResponse):
            # the neuron answered whole JSON to a stream request (its answer was already read)
            error = ApiError(502, "upstream_bad_answer", "the neuron did not stream its answer")
            for frame in translator.fail(error):
                yield frame
            return
        started = True
        async for chunk in relayed.body_iterator:
            yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
    finally:
        if not answer.done():
            answer.cancel()
        elif not started:
            _release_unsent(answer)
        elif relayed is not None:
            iterator = relayed.body_iterator
            if hasattr(iterator, "aclose"):
                await iterator.aclose()


def _release_unsent(answer: asyncio.Future[Response]) -> None:
    """The client left before a routed stream was relayed: give its upstream back (and mark
    a failed routing as seen, so asyncio does not log it as never retrieved)."""
    if answer.cancelled() or answer.exception() is not None:
        return
    result = answer.result()
    if isinstance(result, TranslatedStream):
        result.release()


async def messages_answer(
    gateway: Gateway, route: str, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """Anthropic Messages: translated to a chat request, answered in Anthropic's shape."""
    parsed = anthropic.parse_messages_request(
        payload, hosted_tools=gateway.config.gateway.hosted_tools
    )
    return await serve_translated(
        gateway,
        route,
        headers,
        parsed.model,
        parsed.chat,
        lambda completion: anthropic.message_from_chat_completion(
            completion, parsed.model, thinking=parsed.thinking
        ),
        (lambda: anthropic.AnthropicStreamTranslator(parsed.model, thinking=parsed.thinking))
        if parsed.stream
        else None,
        parsed.dropped_tools,
    )


async def count_tokens_answer(
    gateway: Gateway, route: str, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """The real prompt length: the neuron renders the same messages and tools (the model is
    loaded first when cold, as for a request)."""
    parsed = anthropic.parse_count_tokens_request(payload)
    answer = await gateway.tokenize(parsed.model, parsed.tokenize)
    return JSONResponse(anthropic.count_tokens_response(answer))


async def responses_answer(
    gateway: Gateway, route: str, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """OpenAI Responses: translated to a chat request, answered as a ``response``."""
    parsed = responses.parse_responses_request(
        payload, hosted_tools=gateway.config.gateway.hosted_tools
    )
    return await serve_translated(
        gateway,
        route,
        headers,
        parsed.model,
        parsed.chat,
        lambda completion: responses.response_from_chat_completion(completion, parsed),
        (lambda: responses.ResponsesStreamTranslator(parsed)) if parsed.stream else None,
        parsed.dropped_tools,
    )


# The dialect routes and their answers; ``cortex.gateway.app`` serves them as plain ASGI
# (``cortex.gateway.fast_path``), :func:`install_dialect_routes` through FastAPI.
DIALECT_ANSWERS = {
    "/v1/messages": messages_answer,
    "/v1/messages/count_tokens": count_tokens_answer,
    "/v1/responses": responses_answer,
}


def install_dialect_routes(app: FastAPI, gateway: Gateway) -> None:
    """``POST /v1/messages``, ``/v1/messages/count_tokens`` and ``/v1/responses``."""

    def route_for(answer: DialectAnswer) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            route = request.url.path
            payload: dict[str, Any] | None = None
            try:
                payload = await read_json_object(request, gateway.config.gateway.max_body_bytes)
                return await answer(gateway, route, payload, request.headers)
            except ApiError as exc:
                gateway.record_failure(route, payload.get("model") if payload else None, exc)
                raise

        handler.__doc__ = answer.__doc__
        return handler

    for path, answer in DIALECT_ANSWERS.items():
        app.add_api_route(path, route_for(answer), methods=["POST"])
