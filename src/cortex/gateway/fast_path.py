"""The generation routes served as plain ASGI, ahead of FastAPI: the one path from a request's
bytes to its answer ("read JSON -> answer -> record failure" happens here and nowhere else).

Why plain ASGI: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/messages`` (and its
``count_tokens``) and ``/v1/responses`` are the gateway's hot path, and under load most of a
request's CPU went to the layers around the handler, not to the work (profile in
docs/benchmarks.md): Starlette's routing and request object, FastAPI's dependency machinery and
exit stacks, five middlewares each wrapping ``send`` -- a wrapper that every streamed chunk
passed through again. Here one plain ASGI callable does what those layers did, in the same order
and with the same answers: the key check (401/403), the body limit (413 before a byte is read
when ``Content-Length`` says so, else at the first byte over it), the JSON body (typed 400s), the
client watch for queued waiters, then the route's answer (:mod:`cortex.gateway.routes`), and
every failure in the route's envelope (Anthropic's on ``/v1/messages*``, else OpenAI's),
recorded on the request's tally (:mod:`cortex.gateway.tally`).

These paths have no FastAPI route: a request under a ``root_path`` is matched here too
(:class:`cortex.gateway.app.GatewayApp` strips it), another method gets 405 here, and the
OpenAPI document describes them from the same table.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from starlette.requests import ClientDisconnect

from cortex.auth import GatewayAuth
from cortex.gateway.admission import CURRENT_RECEIVE
from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.routes import GenerationRoute
from cortex.gateway.tally import Recorder, Tally
from cortex.wire.asgi import content_length, scope_headers, send_error
from cortex.wire.errors import ApiError
from cortex.wire.http import parse_json_object
from cortex.wire.limits import BodyTooLarge, too_large

log = logging.getLogger(__name__)


class ClientLeft(Exception):
    """The client disconnected before its request body was read: nobody waits for an answer."""


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole request body, or :class:`BodyTooLarge` at the first byte over ``limit``."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientLeft
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _body_too_large(limit)
        return body
    chunks, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _body_too_large(limit: int) -> BodyTooLarge:
    error = too_large(limit)
    return BodyTooLarge(error.status, error.code, error.message)


class PlainEndpoint:
    """One generation route as an ASGI callable (see the module docstring)."""

    def __init__(
        self,
        route: GenerationRoute,
        dispatcher: Dispatcher,
        recorder: Recorder,
        auth: GatewayAuth,
        max_body_bytes: int,
    ) -> None:
        self.route = route
        self.answer = route.answer
        self.dialect = route.dialect
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.auth = auth
        self.limit = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = self.route.path
        dialect = self.dialect
        headers = scope_headers(scope)
        key = self.auth.authenticate(path, headers)  # who it is (None: auth off)
        if isinstance(key, ApiError):
            self.recorder.open(path).fail(key)
            extra = {"WWW-Authenticate": "Bearer"} if key.status == 401 else None
            await send_error(send, key, dialect, extra)
            return
        if scope["method"] != "POST":
            await send_error(
                send, ApiError(405, "method_not_allowed", "Method Not Allowed"), dialect
            )
            return
        limit = self.limit
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, too_large(limit), dialect, close=True)
            return

        tally: Tally | None = None
        watching = CURRENT_RECEIVE.set(receive)  # queued waiters see their client leave
        try:
            payload = parse_json_object(await read_body(receive, limit))
            tally = self.recorder.open(path, key)
            tally.requested = payload.get("model")
            response = await self.answer(self.dispatcher, tally, payload, headers)
        except ClientLeft:
            return
        except ApiError as exc:
            (tally or self.recorder.open(path, key)).fail(exc)
            await send_error(send, exc, dialect, close=isinstance(exc, BodyTooLarge))
            return
        except Exception as exc:
            log.exception("unexpected error on POST %s", path)
            internal = ApiError(
                500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
            )
            (tally or self.recorder.open(path)).fail(internal)
            await send_error(send, internal, dialect)
            return
        finally:
            CURRENT_RECEIVE.reset(watching)
        # A client that leaves mid-answer: the response has already closed its upstream.
        with contextlib.suppress(ClientDisconnect, OSError):
            await response(scope, receive, send)
