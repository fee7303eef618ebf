"""Talking to a neuron for a client's request: sending it, holding it while the neuron's queue is
full, and relaying a streamed answer.

What is done with the answer once its headers arrived (passed through with the ``model`` field
rewritten, or translated into another dialect) is an answer policy's job
(:mod:`cortex.gateway.policies`); choosing the neuron and sending again elsewhere is the
dispatcher's (:mod:`cortex.gateway.dispatch`).

Chunks are forwarded as they arrive, never buffered: a streamed answer (``text/event-stream``)
is forwarded frame by frame, ``[DONE]`` included. The only change made on the way is the
``model`` field, which says what the client asked for (an alias stays an alias); that rewrite
works on whole SSE frames, so a frame split across reads is held only until its end arrives.

Timeouts are a connect timeout and an *idle* timeout between chunks (aiohttp's ``sock_read``),
never a total one: a long stream that keeps producing is never cut. When the client goes away
Starlette cancels the response; closing the upstream response then closes the connection to the
neuron, which stops generating within one step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from cortex.gateway.admission import HOLD_UNTIL, ClientGone, pause_unless_client_left
from cortex.gateway.redact import public_details, public_message
from cortex.gateway.stream_probe import frames_have_content, stream_error_code, take_usage
from cortex.wire.errors import ApiError
from cortex.wire.sse import encode_data
from cortex.wire.stream_response import WatchedStreamingResponse

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed or set by our own server, or meaningless after aiohttp decoded the body.
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection") or headers.get("Connection") or ""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def upstream_request_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's end-to-end headers (hop-by-hop ones and those named by Connection dropped)."""
    drop = _NOT_FORWARDED_UP | _connection_tokens(client_headers)
    headers = {k: v for k, v in client_headers.items() if k.lower() not in drop}
    headers["content-type"] = "application/json"
    return headers


def downstream_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    drop = _NOT_FORWARDED_DOWN | _connection_tokens(upstream)
    return {k: v for k, v in upstream.items() if k.lower() not in drop}


class ModelRewriter:
    """Replace ``"model": "<canonical>"`` by ``"model": "<requested>"`` in JSON text.

    The neuron writes ``"model": "<id>"`` (``json.dumps``' default separators) in every chunk,
    so a plain byte replace of that spelling does the work of the regex at C speed; the regex
    (any whitespace around the colon) only runs when the canonical id is still there after it.
    A rewriter is built per request, so the pattern is compiled lazily, on first need."""

    def __init__(self, canonical: str, requested: str) -> None:
        self.active = canonical != requested
        self._quoted = json.dumps(canonical).encode()
        self._usual = b'"model": ' + self._quoted
        self._replacement = b'"model":' + json.dumps(requested).encode()
        self._pattern: re.Pattern[bytes] | None = None

    def __call__(self, data: bytes) -> bytes:
        if not self.active:
            return data
        data = data.replace(self._usual, self._replacement)
        if self._quoted not in data:
            return data
        if self._pattern is None:
            self._pattern = re.compile(rb'"model"\s*:\s*' + re.escape(self._quoted))
        replacement = self._replacement
        return self._pattern.sub(lambda _m: replacement, data)


UsageCallback = Callable[[dict[str, Any]], None]


class UpstreamUnreachable(ApiError):
    """No answer headers came back: nothing reached the client yet, another replica may serve."""

    never_connected: bool = False


class Observer(Protocol):
    """What a relayed answer reports to: :class:`cortex.gateway.tally.Tally` (metrics, the
    request log, the request's lease)."""

    def on_first_token(self) -> None:
        """Streamed answers only: the first chunk carrying content, not the first byte."""

    def on_usage(self, usage: dict[str, Any]) -> None:
        """Token counts the neuron reported."""

    def on_end(self, error: str | None) -> None:
        """The answer is over (idempotent: the first report wins)."""

    # A request whose key has a token budget or rate (cortex.gateway.metering): its output
    # tokens are counted as they stream, and the stream ends at the budget.
    cut: bool

    @property
    def metered(self) -> bool:
        """Whether output tokens are counted as they stream."""

    def on_streamed(self, tokens: int) -> bool:
        """``tokens`` more output tokens streamed; False when the key's budget is spent."""

    def streamed_usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens as known now."""


class UpstreamStreamingResponse(WatchedStreamingResponse):
    """A streamed answer relayed from a neuron. It always releases its upstream, even when the
    client left before the body iterator started (the iterator's ``finally`` would then never
    run); a client that leaves mid-stream cancels the relay, which closes the neuron connection
    (the neuron then stops generating)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        upstream: aiohttp.ClientResponse,
        observer: Observer,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._upstream = upstream
        self._observer = observer

    def release(self) -> None:
        self._upstream.close()
        answer_ended(str(self._upstream.url))
        self._observer.on_end("client_disconnected")


def _stream_error_frame(code: str, message: str) -> bytes:
    return encode_data({"error": {"message": message, "type": "upstream_error", "code": code}})


async def relay_sse(
    resp: aiohttp.ClientResponse,
    rewrite: ModelRewriter,
    observer: Observer,
    drop_usage_only: bool = False,
    chunks: AsyncIterator[bytes] | None = None,
) -> AsyncIterator[bytes]:
    """``resp``'s SSE frames (or ``chunks`` read from it: a metered stream) relayed with the
    model rewritten, the first token and the usage reported to ``observer``."""
    buffer = b""
    waiting_for_token = True
    error: str | None = None
    try:
        async for chunk in chunks if chunks is not None else resp.content.iter_any():
            buffer += chunk
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            complete, buffer = buffer[: end + 2], buffer[end + 2 :]
            if waiting_for_token and frames_have_content(complete):
                waiting_for_token = False
                observer.on_first_token()
            if error is None:
                error = stream_error_code(complete)  # the neuron failed it in-band
            if b'"usage"' in complete:
                usage, complete = take_usage(complete, drop_usage_only)
                if usage:
                    observer.on_usage(usage)
                if not complete:
                    continue
            yield rewrite(complete)
        if buffer:
            yield rewrite(buffer)
    except asyncio.CancelledError:  # the client went away: closing resp stops the neuron
        error = "client_disconnected"
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        error = "upstream_timeout"
        yield _stream_error_frame(error, "the neuron stopped sending (idle timeout)")
    except aiohttp.ClientError as exc:
        error = "upstream_connection_error"
        log.warning("the connection to %s broke mid-stream: %r", resp.url, exc)
        yield _stream_error_frame(
            error, f"the neuron connection broke mid-answer ({type(exc).__name__})"
        )
    finally:
        resp.close()
        answer_ended(str(resp.url))
        observer.on_end(error)


# ---- holding requests a neuron cannot take yet ----------------------------------------------
#
# A neuron bounds the requests it runs per device (``max_queue``) and answers one more with
# 503 ``queue_full``. The gateway's own bounds are larger (256 in flight per model, 512
# queued, a minute of waiting), so passing that 503 on refused clients long before the gateway's
# documented limits: 150 concurrent streams for one replica got 86 of them. Instead the request
# is held: it waits, first come first served with the other requests that neuron refused, and is
# sent again when an answer from that neuron ends (or after a short backoff, at most
# HOLD_MAX_BACKOFF), until the admission budget (``queue_timeout``, HOLD_UNTIL) is spent; only
# then does the client get the neuron's 503. A client that disconnects while held is dropped at
# once. While requests are held for a neuron, new ones for it queue behind them rather than
# overtaking them. Requests that skip the model's gate (count_tokens) are held the same way.
#
# The turn (one held request sending at a time, oldest first) covers sending and hearing whether
# the neuron refused, not the answer: a whole (non-streamed) answer's headers come only once it
# is generated, and keeping the turn until then sent held requests one at a time (150 whole
# requests for one replica: 35 refused after the minute). So a held request's POST runs as a
# task; the turn waits for it at most HOLD_ADMIT_GRACE, and a POST still unanswered then was
# taken by the neuron (which refuses at once, before any work): its answer is awaited outside
# the turn, and the next held request goes. While the neuron has room for sure (answers from it
# ended since it last refused one: ``_Holding.room``) held requests go without that wait, so
# they fill each room as fast as it frees. A refusal that comes later after all (a neuron slower
# than the grace, or another gateway that took the room) is held again, behind the others.
# Cancelling the request cancels its POST (closing the connection stops the neuron) and closes
# an answer that raced in.

HOLD_FIRST_BACKOFF = 0.05
HOLD_MAX_BACKOFF = 0.5
# A neuron answers queue_full from its event loop as it reads the request, before any work is
# queued: one round trip, milliseconds on a LAN. 0.1 s leaves
# room for a busy neuron or gateway loop, and bounds what the grace costs: while the neuron's
# room is not known, held requests go at most ten a second (each taken one within 0.1 s).
HOLD_ADMIT_GRACE = 0.1


class _Holding:
    """The requests held for one neuron (per event loop: tests run gateways side by side)."""

    def __init__(self) -> None:
        self.turn = asyncio.Lock()  # FIFO: the oldest held request goes first
        self.freed = asyncio.Event()  # set when an answer from this neuron ends
        self.held = 0
        # Answers from this neuron that ended since it last refused one (while requests are
        # held): room it has for sure, so that many held requests go without HOLD_ADMIT_GRACE.
        self.room = 0


_HOLDING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Holding]] = (
    weakref.WeakKeyDictionary()
)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _holding(url: str) -> _Holding:
    per_loop = _HOLDING.setdefault(asyncio.get_running_loop(), {})
    origin = _origin(url)
    found = per_loop.get(origin)
    if found is None:
        found = per_loop[origin] = _Holding()
    return found


def answer_ended(url: str) -> None:
    """An answer from the neuron at ``url`` is over: the oldest held request may try again."""
    per_loop = _HOLDING.get(asyncio.get_running_loop())
    holding = per_loop.get(_origin(url)) if per_loop else None
    if holding is not None and holding.held:
        holding.room += 1
        holding.freed.set()


async def _error_code(resp: aiohttp.ClientResponse) -> str | None:
    """The ``code`` of a neuron's 404/503 error envelope (its small body is read: it stays
    readable for the caller); None for any other answer."""
    if resp.status not in (404, 503):
        return None
    try:
        body = json.loads(await resp.read())
    except (ValueError, aiohttp.ClientError, TimeoutError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code")) if isinstance(error, dict) else None


async def _is_queue_full(resp: aiohttp.ClientResponse) -> bool:
    """Whether ``resp`` is the neuron's 503 ``queue_full``."""
    return resp.status == 503 and await _error_code(resp) == "queue_full"


# A neuron's answer that the model is not (or no longer) there: the gateway's view of that node
# was stale (another gateway, or an operator on the neuron, unloaded it since the last poll).
_GONE = frozenset({"model_not_found", "model_unloading"})


async def open_upstream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    client_headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    retry_after: float,
) -> aiohttp.ClientResponse:
    """POST to a neuron and return once its answer headers arrived (the body is not read);
    failing that, :class:`UpstreamUnreachable`. A 503 ``queue_full`` is held and sent again
    within the request's admission budget (see above). A neuron that says the model is not
    loaded (or is being unloaded) there is, for this request, like one that could not be
    reached before answering: nothing was relayed, so the caller refreshes its view of that
    node and tries another replica, or answers 503 ``model_unloaded`` with Retry-After."""
    resp = await _open_held(session, url, body, client_headers, timeout, retry_after)
    if await _error_code(resp) in _GONE:
        resp.close()
        error = UpstreamUnreachable(
            503,
            "model_unloaded",
            "the model was unloaded from the neuron this request was sent to; retry",
            retry_after=retry_after,
        )
        error.never_connected = True  # safe to send elsewhere: no byte of answer was relayed
        raise error
    return resp


async def _open_held(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    client_headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    retry_after: float,
) -> aiohttp.ClientResponse:
    """:func:`_send_upstream`, holding a ``queue_full`` answer (see above)."""
    until = HOLD_UNTIL.get()
    if until is None:
        return await _send_upstream(session, url, body, client_headers, timeout, retry_after)
    holding = _holding(url)
    if not holding.held:
        resp = await _send_upstream(session, url, body, client_headers, timeout, retry_after)
        if not await _is_queue_full(resp) or time.monotonic() >= until:
            return resp
        # Its body was read whole, so its connection is back in the pool; not released, so the
        # caller can still read it if it becomes the answer.
        refused: aiohttp.ClientResponse | None = resp
    else:
        refused = None  # others are held for this neuron: queue behind them
    holding.held += 1
    try:
        while True:
            sending = await _send_in_turn(
                holding, refused, until, session, url, body, client_headers, timeout, retry_after
            )
            if not isinstance(sending, asyncio.Task):
                return sending  # answered, or refused for good, within the turn
            resp = await _outcome(sending)  # admitted: its answer is awaited outside the turn
            if not await _is_queue_full(resp):
                return resp
            holding.room = 0
            refused = resp  # refused after all (a slow neuron, another gateway): held again
    finally:
        holding.held -= 1
        if not holding.held:
            holding.room = 0


async def _send_in_turn(
    holding: _Holding,
    refused: aiohttp.ClientResponse | None,
    until: float,
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    client_headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    retry_after: float,
) -> aiohttp.ClientResponse | asyncio.Task[aiohttp.ClientResponse]:
    """Wait for the turn and send, again as the neuron frees room while it refuses; return its
    answer (or the last refusal once the budget is spent), or the POST still in flight after
    HOLD_ADMIT_GRACE: the neuron took it, and the turn goes to the next held request."""
    async with holding.turn:
        backoff = HOLD_FIRST_BACKOFF
        while True:
            if refused is not None and not holding.room:
                left = until - time.monotonic()
                if left <= 0:
                    return refused  # the budget is spent: the client gets the neuron's 503
                holding.freed.clear()
                try:
                    await pause_unless_client_left(holding.freed, min(backoff, left))
                except ClientGone:
                    # Nothing was relayed: the caller ends the request's bookkeeping as for an
                    # unreachable neuron, and nobody reads the answer.
                    raise UpstreamUnreachable(
                        499, "client_closed", "the client went away while held"
                    ) from None
                backoff = min(HOLD_MAX_BACKOFF, backoff * 2)
            elif refused is not None and until <= time.monotonic():
                return refused
            grace = HOLD_ADMIT_GRACE
            if holding.room:  # the neuron has room for it: the turn passes on at once
                holding.room -= 1
                grace = 0
            sending = asyncio.ensure_future(
                _send_upstream(session, url, body, client_headers, timeout, retry_after)
            )
            try:
                await asyncio.wait({sending}, timeout=grace)
            except BaseException:
                _drop(sending)
                raise
            if not sending.done():
                return sending
            resp = await _outcome(sending)
            if not await _is_queue_full(resp):
                return resp
            holding.room = 0
            refused = resp


async def _outcome(sending: asyncio.Task[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
    """The answer of a POST sent as a task; when the request is cancelled meanwhile (its client
    went away), the POST is cancelled too and an answer that raced in is released."""
    try:
        return await asyncio.shield(sending)
    except asyncio.CancelledError:
        _drop(sending)
        raise


def _drop(sending: asyncio.Task[aiohttp.ClientResponse]) -> None:
    if not sending.done():
        sending.cancel()
    elif not sending.cancelled() and sending.exception() is None:
        sending.result().close()


async def _send_upstream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    client_headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    retry_after: float,
) -> aiohttp.ClientResponse:
    """One POST: return once its answer headers arrived, else :class:`UpstreamUnreachable`.

    A pooled keep-alive connection that the neuron closed as the request went out ("Server
    disconnected", "Can not write request body": its idle timer fired while our event loop had
    not yet read the FIN) is not the neuron being down: the request is sent once more, on
    another connection, before the caller hears of it. Generation has no side effects, so a
    request the neuron may have read before it closed is safe to send again."""
    headers = upstream_request_headers(client_headers)
    for attempt in (1, 2):
        try:
            return await session.post(url, data=body, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            log.warning("%s did not answer in time", url)
            raise UpstreamUnreachable(
                504,
                "upstream_timeout",
                "the neuron did not answer in time",
                retry_after=retry_after,
            ) from None
        except aiohttp.ClientConnectorError as exc:  # no connection could be made at all
            raise _unreachable(exc, retry_after, never_connected=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if attempt == 1:
                log.info("connection to %s closed under the request (%s); sending again", url, exc)
                continue
            # Safe to send elsewhere too: no byte of answer came back.
            raise _unreachable(exc, retry_after, never_connected=True) from None
        except aiohttp.ClientError as exc:
            raise _unreachable(exc, retry_after, never_connected=False) from None
    raise AssertionError("unreachable: the second attempt returns or raises")


def _unreachable(
    exc: aiohttp.ClientError, retry_after: float, never_connected: bool
) -> UpstreamUnreachable:
    # The client hears what happened, not where (docs/security.md); the log has both.
    log.warning("could not reach a neuron: %s: %s", type(exc).__name__, exc)
    error = UpstreamUnreachable(
        502,
        "upstream_connection_error",
        f"could not reach the neuron ({type(exc).__name__})",
        retry_after=retry_after,
    )
    error.never_connected = never_connected
    return error


def public_error_body(raw: bytes) -> bytes:
    """A neuron's error envelope with its message and ``details`` redacted
    (:mod:`cortex.gateway.redact`); anything else as it came."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return raw
    message = public_message(error["message"])
    details = public_details(error["details"]) if "details" in error else None
    if message == error["message"] and details == error.get("details"):
        return raw
    error["message"] = message
    if details is not None:
        error["details"] = details
    return json.dumps(body).encode()
