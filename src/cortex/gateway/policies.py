"""Answer policies: what a request sends a neuron, and how the neuron's answer becomes the
client's. The dispatcher (:mod:`cortex.gateway.dispatch`) is the one mechanism around them --
admit, route, send, send elsewhere while nothing was relayed, give the lease back -- and a policy
is the part that differs between routes:

- :class:`PassThrough` (``/v1/chat/completions``, ``/v1/completions``): the client's body with
  the canonical model id, relayed as is (streams frame by frame) with the ``model`` field
  rewritten back to what the client asked for; a neuron's error keeps its status and envelope,
  redacted.
- :class:`Translate` (``/v1/messages``, ``/v1/responses``): a chat body another dialect was
  translated into; the answer is translated back, whole or event by event; a neuron's error
  becomes an :class:`ApiError` the route renders in its own envelope.
- :class:`Tokenize` (``/v1/messages/count_tokens``): the neuron's ``POST /tokenize``, its JSON
  answer handed to a function that builds the client's.

Every policy must end the request's observer exactly once (at once, or when a stream ends);
the dispatcher ends it if a policy raised before it did.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from starlette.responses import JSONResponse, Response

from cortex.gateway.metering import metered
from cortex.gateway.neuron_client import retry_after_of
from cortex.gateway.proxy import (
    ModelRewriter,
    Observer,
    UpstreamStreamingResponse,
    answer_ended,
    downstream_headers,
    public_error_body,
    relay_sse,
)
from cortex.gateway.redact import public
from cortex.gateway.stream_probe import chunk_has_content
from cortex.wire.errors import ApiError
from cortex.wire.openai_types import stream_error
from cortex.wire.streaming import StreamTranslator, translate_sse

log = logging.getLogger(__name__)

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
CHAT_ROUTE = "/v1/chat/completions"
TOKENIZE_ROUTE = "/tokenize"

WholeTranslator = Callable[[dict[str, Any]], dict[str, Any]]
TranslatorFactory = Callable[[], StreamTranslator]


class AnswerPolicy(Protocol):
    """The part of a request that differs between routes (see the module docstring)."""

    upstream_route: str  # the neuron route the request goes to
    queued: bool  # through the model's admission gate (generation), or not (count_tokens)

    def body(self, canonical: str) -> bytes:
        """The JSON body the neuron gets (built once per request)."""

    async def answer(
        self,
        resp: aiohttp.ClientResponse,
        observer: Observer,
        headers: Mapping[str, str],
        retry_after: float,
    ) -> Response:
        """The client's answer from the neuron's (its headers arrived, its body is unread);
        ``headers`` are the gateway's own (``x-cortex-node``, ``x-cortex-model``)."""


async def read_error(resp: aiohttp.ClientResponse, retry_after: float) -> ApiError:
    """A neuron's error answer as an :class:`ApiError` fit for a client: its status, code,
    message and Retry-After (the gateway's when a 5xx has none), redacted."""
    try:
        raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    finally:
        resp.close()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    error = ApiError.from_openai_body(resp.status, payload, retry_after_of(resp.headers))
    if error.status >= 500 and error.retry_after is None:
        error.retry_after = retry_after
    return public(error)  # no paths or addresses to clients (docs/security.md)


# ---- pass-through ---------------------------------------------------------------------------


class PassThrough:
    """OpenAI chat and completions, relayed as the neuron answers them."""

    queued = True

    def __init__(
        self, route: str, payload: dict[str, Any], requested: str, metering: bool = False
    ) -> None:
        self.upstream_route = route
        self._payload = payload
        self._requested = requested
        # A key with a token budget or rate: its stream is counted as it passes (and ended at
        # the budget); a chat stream asks for the prompt's length up front (the first chunk's
        # usage, taken out before the client sees it), so the prompt counts from the start.
        self._metered = metering and payload.get("stream") is True
        self._kind = "completion" if route == "/v1/completions" else "chat"
        self._canonical = ""
        # Token metrics need the usage a stream reports only when asked: ask on behalf of a
        # client that did not, and keep that usage-only chunk from it.
        options = payload.get("stream_options")
        self._drop_usage_only = (
            payload.get("stream") is True
            and (options is None or isinstance(options, dict))
            and not (options or {}).get("include_usage")
        )
        self._rewrite: ModelRewriter | None = None

    def body(self, canonical: str) -> bytes:
        upstream = {**self._payload, "model": canonical}
        if self._drop_usage_only:
            options = self._payload.get("stream_options")
            upstream["stream_options"] = {**(options or {}), "include_usage": True}
        if self._metered and self._kind == "chat":
            extension = self._payload.get("cortex")
            extension = extension if isinstance(extension, dict) else {}
            upstream["cortex"] = {**extension, "report_prompt_tokens": True}
        self._canonical = canonical
        self._rewrite = ModelRewriter(canonical, self._requested)
        return json.dumps(upstream).encode()

    async def answer(
        self,
        resp: aiohttp.ClientResponse,
        observer: Observer,
        headers: Mapping[str, str],
        retry_after: float,
    ) -> Response:
        """Relayed as is: errors keep status, envelope and Retry-After (redacted); the observer
        ends when the answer is over (a stream: at its last frame or when the client leaves)."""
        rewrite = self._rewrite
        assert rewrite is not None, "body() first"
        out = {**downstream_headers(resp.headers), **headers}
        content_type = resp.headers.get("content-type", "")
        if resp.status == 200 and content_type.startswith("text/event-stream"):
            out.setdefault("cache-control", "no-cache")
            out["x-accel-buffering"] = "no"
            chunks = None
            if self._metered and observer.metered:
                chunks = metered(
                    resp.content.iter_any(),
                    observer,
                    self._kind,
                    self._canonical,
                    strip_first_usage=self._kind == "chat",
                )
            return UpstreamStreamingResponse(
                relay_sse(resp, rewrite, observer, self._drop_usage_only, chunks),
                resp,
                observer,
                status_code=200,
                headers=out,
            )
        url = str(resp.url)
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            resp.close()
            observer.on_end("upstream_timeout")
            raise ApiError(
                504,
                "upstream_timeout",
                "the neuron did not finish its answer within the idle timeout",
                retry_after=retry_after,
            ) from None
        except aiohttp.ClientError as exc:
            resp.close()
            observer.on_end("upstream_connection_error")
            log.warning("the connection to %s broke mid-answer: %r", url, exc)
            raise ApiError(
                502,
                "upstream_connection_error",
                f"the neuron connection broke mid-answer ({type(exc).__name__})",
                retry_after=retry_after,
            ) from None
        finally:
            resp.release()
        if resp.status >= 400:
            raw = public_error_body(raw)
        if resp.status == 200:
            raw = rewrite(raw)
            try:
                usage = json.loads(raw).get("usage")
            except (ValueError, AttributeError):
                usage = None
            if isinstance(usage, dict):
                observer.on_usage(usage)
        # The neuron is done once its answer is read: end the in-flight count now, not after
        # the client got the bytes (its next request must not see this one as still running).
        answer_ended(url)
        observer.on_end(None if resp.status == 200 else f"upstream_{resp.status}")
        return Response(raw, status_code=resp.status, headers=out)


# ---- translation ----------------------------------------------------------------------------


class TranslatedStream(UpstreamStreamingResponse):
    """A translated answer stream; :meth:`release` (inherited) gives its upstream back when the
    stream is relayed inside another one (a kept-alive stream) and the client left before it
    began."""


class Translate:
    """A chat request another dialect was translated into; the answer translated back."""

    upstream_route = CHAT_ROUTE
    queued = True

    def __init__(
        self,
        chat: dict[str, Any],
        whole: WholeTranslator,
        stream: TranslatorFactory | None,
        ping_interval: float = 10.0,
    ) -> None:
        self._chat = chat
        self._whole = whole
        self._stream = stream
        self._ping_interval = ping_interval
        self._canonical = ""

    def body(self, canonical: str) -> bytes:
        self._canonical = canonical
        return json.dumps({**self._chat, "model": canonical}).encode()

    async def answer(
        self,
        resp: aiohttp.ClientResponse,
        observer: Observer,
        headers: Mapping[str, str],
        retry_after: float,
    ) -> Response:
        if resp.status != 200:
            observer.on_end(f"upstream_{resp.status}")
            raise await read_error(resp, retry_after)
        content_type = resp.headers.get("content-type", "")
        if self._stream is not None and content_type.startswith("text/event-stream"):
            return TranslatedStream(
                _translated_stream(
                    resp, self._stream(), observer, self._ping_interval, self._canonical
                ),
                resp,
                observer,
                media_type="text/event-stream",
                headers={**headers, **STREAM_HEADERS},
            )
        completion = await _read_whole(resp, observer, retry_after)
        usage = completion.get("usage")
        if isinstance(usage, dict):
            observer.on_usage(usage)
        observer.on_end(None)
        return JSONResponse(self._whole(completion), headers=dict(headers))


async def _read_whole(
    resp: aiohttp.ClientResponse, observer: Observer, retry_after: float
) -> dict[str, Any]:
    """A neuron's whole JSON answer (the observer ends when it cannot be read)."""
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
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        observer.on_end("upstream_bad_answer")
        raise ApiError(502, "upstream_bad_answer", "the neuron answered something that is not JSON")
    return answer


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in resp.content.iter_any():
        yield chunk


async def _translated_stream(
    resp: aiohttp.ClientResponse,
    translator: StreamTranslator,
    observer: Observer,
    ping_interval: float,
    canonical: str = "",
) -> AsyncIterator[bytes]:
    waiting_for_token = True
    failed: str | None = None

    def on_chunk(chunk: dict[str, Any]) -> None:
        nonlocal waiting_for_token, failed
        if waiting_for_token and chunk_has_content(chunk):
            waiting_for_token = False
            observer.on_first_token()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            observer.on_usage(usage)
        if failed is None and "error" in chunk:
            found = stream_error(chunk)  # the neuron failed the generation in-band
            failed = (found.code or "stream_error") if found is not None else None

    error: str | None = None
    try:
        chunks = _chunks(resp)
        if observer.metered:  # counted as it passes, ended cleanly at the key's budget
            chunks = metered(chunks, observer, "chat", canonical)
        async for frame in translate_sse(
            chunks, translator, ping_interval=ping_interval, on_chunk=on_chunk
        ):
            yield frame
    except BaseException:
        error = "client_disconnected"
        raise
    finally:
        resp.close()  # a client that went away closes the neuron's request too
        answer_ended(str(resp.url))
        observer.on_end(error or failed)


# ---- tokenize -------------------------------------------------------------------------------


class Tokenize:
    """``POST /tokenize`` on the neuron serving the model (loaded first when cold); its JSON
    answer becomes the client's through ``respond``. Not queued behind generation requests."""

    upstream_route = TOKENIZE_ROUTE
    queued = False

    def __init__(
        self, tokenize: dict[str, Any], respond: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        self._tokenize = tokenize
        self._respond = respond

    def body(self, canonical: str) -> bytes:
        return json.dumps({**self._tokenize, "model": canonical}).encode()

    async def answer(
        self,
        resp: aiohttp.ClientResponse,
        observer: Observer,
        headers: Mapping[str, str],
        retry_after: float,
    ) -> Response:
        if resp.status != 200:
            observer.on_end(f"upstream_{resp.status}")
            raise await read_error(resp, retry_after)
        answer = await _read_whole(resp, observer, retry_after)
        observer.on_end(None)
        return JSONResponse(self._respond(answer))
