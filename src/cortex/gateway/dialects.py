"""The Anthropic Messages and OpenAI Responses routes: translate, route, relay, translate back.

Neurons speak OpenAI chat completions only. A ``/v1/messages`` or ``/v1/responses`` request is
translated into a chat request by the pure translators in :mod:`cortex.wire`, served by the one
request mechanism (:meth:`cortex.gateway.dispatch.Dispatcher.serve`: aliases, admission, cold
loads, least busy replica, metrics) with the :class:`cortex.gateway.policies.Translate` policy,
and the answer is translated back: whole, or chunk by chunk as it streams (never buffered). A
neuron's error keeps its status, code, message and Retry-After, rendered in the route's
envelope.

Streams keep the client's connection alive from the first moment: when no answer headers came
back within one keep-alive interval (a cold load, a queue, a long prefill), the stream starts
anyway with ``message_start`` / ``response.created`` and pings, and an error that arrives later
becomes the dialect's ``error`` event (and is recorded on the request's tally then). Errors that
are known at once keep their HTTP status.

Translated requests carry the ``cortex.clamp_max_tokens`` extension (docs/clients.md): Claude
Code asks for ``max_tokens: 32000`` whatever the model, and Anthropic treats max_tokens as a
ceiling, so the neuron clamps the budget to the context left instead of answering 400.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response, StreamingResponse

from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.policies import (
    STREAM_HEADERS,
    Tokenize,
    Translate,
    TranslatedStream,
    TranslatorFactory,
    WholeTranslator,
)
from cortex.gateway.tally import Tally
from cortex.wire import anthropic, responses
from cortex.wire.errors import ApiError
from cortex.wire.streaming import StreamTranslator

log = logging.getLogger(__name__)

# The neuron request extension every translated request carries (docs/clients.md): the
# max_tokens clamp, and the prompt's length on the first chunk (message_start's usage).
CLAMP_EXTENSION = {"clamp_max_tokens": True, "report_prompt_tokens": True}
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


# ---- the routes ---------------------------------------------------------------------------


async def serve_translated(
    dispatcher: Dispatcher,
    tally: Tally,
    headers: Mapping[str, str],
    model: str,
    chat: dict[str, Any],
    whole: WholeTranslator,
    stream: TranslatorFactory | None,
    dropped: tuple[str, ...] = (),
) -> Response:
    """Serve a translated chat body; a stream that is slow to start is kept alive by pings.
    ``dropped``: hosted tools the request named and cortex left out (said in a header)."""
    chat = {**chat, "cortex": CLAMP_EXTENSION}
    extra = dropped_tools_headers(tally.route, dropped)
    interval = dispatcher.ping_interval
    if stream is None:
        policy = Translate(chat, whole, None, interval)
        return _with_headers(await dispatcher.serve(tally, model, policy, headers), extra)
    translator = stream()  # one translator for the waiting phase and the relayed stream
    policy = Translate(chat, whole, lambda: translator, interval)
    answer = asyncio.ensure_future(dispatcher.serve(tally, model, policy, headers))
    try:
        await asyncio.wait_for(asyncio.shield(answer), interval)
    except TimeoutError:
        return StreamingResponse(
            _kept_alive(answer, translator, interval, tally),
            media_type="text/event-stream",
            headers={**STREAM_HEADERS, **extra, **(tally.limit_headers or {})},
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
    tally: Tally,
) -> AsyncIterator[bytes]:
    """Ping while the routed answer is not there yet, then relay its translated stream. An
    error that came too late for an HTTP status is recorded on ``tally`` (metrics, request
    log) and sent as the dialect's error event."""
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
        error: ApiError | None = None
        try:
            relayed = answer.result()
        except ApiError as failed:
            error = failed
        except Exception as exc:
            log.exception("routing a kept-alive stream failed")
            error = ApiError(500, "internal_error", f"internal error ({type(exc).__name__})")
        if error is not None:
            tally.fail(error)
            for frame in translator.fail(error):
                yield frame
            return
        if not isinstance(relayed, StreamingResponse):
            # the neuron answered whole JSON to a stream request (its answer was already read)
            error = ApiError(502, "upstream_bad_answer", "the neuron did not stream its answer")
            for frame in translator.fail(error):
                yield frame
            return
        streamed: StreamingResponse = relayed
        started = True
        async for chunk in streamed.body_iterator:
            yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
    finally:
        if not answer.done():
            answer.cancel()
        elif not started:
            _release_unsent(answer)
        elif isinstance(relayed, StreamingResponse):
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
    dispatcher: Dispatcher, tally: Tally, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """Anthropic Messages: translated to a chat request, answered in Anthropic's shape."""
    parsed = anthropic.parse_messages_request(
        payload, hosted_tools=dispatcher.config.gateway.hosted_tools
    )
    return await serve_translated(
        dispatcher,
        tally,
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
    dispatcher: Dispatcher, tally: Tally, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """The real prompt length: the neuron renders the same messages and tools (the model is
    loaded first when cold, as for a request)."""
    parsed = anthropic.parse_count_tokens_request(payload)
    policy = Tokenize(parsed.tokenize, anthropic.count_tokens_response)
    return await dispatcher.serve(tally, parsed.model, policy, headers)


async def responses_answer(
    dispatcher: Dispatcher, tally: Tally, payload: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """OpenAI Responses: translated to a chat request, answered as a ``response``."""
    parsed = responses.parse_responses_request(
        payload, hosted_tools=dispatcher.config.gateway.hosted_tools
    )
    return await serve_translated(
        dispatcher,
        tally,
        headers,
        parsed.model,
        parsed.chat,
        lambda completion: responses.response_from_chat_completion(completion, parsed),
        (lambda: responses.ResponsesStreamTranslator(parsed)) if parsed.stream else None,
        parsed.dropped_tools,
    )
