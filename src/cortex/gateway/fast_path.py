"""The generation routes served as plain ASGI, ahead of FastAPI.

Why: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/messages`` (and its
``count_tokens``) and ``/v1/responses`` are the gateway's hot path, and under
load most of a request's CPU went to the layers around the handler, not to the work (profile
in docs/benchmarks.md): Starlette's routing and request object, FastAPI's dependency machinery
and exit stacks, five middlewares each wrapping ``send`` -- a wrapper that every streamed chunk
passed through again. Here one plain ASGI callable does what those layers did for these two
routes, in the same order and with the same answers: the key check (401/403), the body limit
(413 before a byte is read when ``Content-Length`` says so, else at the first byte over it),
the JSON body (typed 400s), the client watch for queued waiters, then the route's answer
(:meth:`cortex.gateway.service.Gateway.generate`, or a dialect's in
:mod:`cortex.gateway.dialects`), and every failure in the route's envelope (Anthropic's on
``/v1/messages*``, else OpenAI's).

The FastAPI routes for the same paths stay registered: they serve requests under a
``root_path`` and document the request bodies (:mod:`cortex.request_schemas`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from cortex.auth import GatewayAuth
from cortex.gateway.admission import CURRENT_RECEIVE
from cortex.gateway.service import Gateway
from cortex.wire.asgi import content_length, scope_headers, send_error
from cortex.wire.errors import OPENAI, ApiError
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


# What a route does once its JSON body is read: (route, payload, headers) -> the answer.
Answer = Callable[[str, dict[str, Any], dict[str, str]], Awaitable[Response]]


class PlainEndpoint:
    """One ``POST`` route as an ASGI callable (see the module docstring)."""

    def __init__(
        self, gateway: Gateway, auth: GatewayAuth, answer: Answer, dialect: str = OPENAI
    ) -> None:
        self.gateway = gateway
        self.auth = auth
        self.answer = answer
        self.dialect = dialect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route: str = scope["path"]
        dialect = self.dialect
        headers = scope_headers(scope)
        error = self.auth.check(route, headers)
        if error is not None:
            extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            await send_error(send, error, dialect, extra)
            return
        gateway = self.gateway
        limit = gateway.config.gateway.max_body_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, too_large(limit), dialect, close=True)
            return

        payload: dict[str, Any] | None = None
        watching = CURRENT_RECEIVE.set(receive)  # queued waiters see their client leave
        try:
            payload = parse_json_object(await read_body(receive, limit))
            response = await self.answer(route, payload, headers)
        except ClientLeft:
            return
        except ApiError as exc:
            gateway.record_failure(route, payload.get("model") if payload else None, exc)
            await send_error(send, exc, dialect, close=isinstance(exc, BodyTooLarge))
            return
        except Exception as exc:
            log.exception("unexpected error on POST %s", route)
            internal = ApiError(
                500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
            )
            gateway.record_failure(route, payload.get("model") if payload else None, internal)
            await send_error(send, internal, dialect)
            return
        finally:
            CURRENT_RECEIVE.reset(watching)
        # A client that leaves mid-answer: the response has already closed its upstream.
        with contextlib.suppress(ClientDisconnect, OSError):
            await response(scope, receive, send)
