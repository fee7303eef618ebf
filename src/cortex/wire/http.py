"""FastAPI glue shared by the gateway, the neuron and the registry: JSON bodies and error handlers.

Handlers read raw JSON and structure it themselves: a malformed body becomes a typed 400 in the
route's envelope, never a traceback, and the hot path skips pydantic.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cortex.wire.errors import ANTHROPIC, OPENAI, ApiError

log = logging.getLogger(__name__)

DialectForPath = Callable[[str], str]

# A JSON ``\\uD800``-``\\uDFFF`` escape: the only way a lone surrogate gets into a parsed body
# (bodies are decoded as strict UTF-8 first, which refuses encoded surrogates; ``json.loads`` of
# bytes would let them through, and would take UTF-16/32 too). Bodies without it skip the walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def default_dialect(path: str) -> str:
    """``/v1/messages`` speaks Anthropic; everything else OpenAI."""
    return ANTHROPIC if path.startswith("/v1/messages") else OPENAI


def error_response(error: ApiError, dialect: str = OPENAI) -> Response:
    return JSONResponse(error.body(dialect), status_code=error.status, headers=error.headers())


async def read_json_object(request: Request, max_bytes: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or a typed 400/413."""
    return parse_json_object(await request.body(), max_bytes)


def parse_json_object(body: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """``body`` as a JSON object, or a typed 400/413 (shared by FastAPI handlers and the
    gateway's plain-ASGI hot path, so both refuse the same bodies the same way)."""
    if max_bytes is not None and len(body) > max_bytes:
        raise ApiError(413, "request_too_large", f"request body over {max_bytes} bytes")
    if not body:
        raise ApiError(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        # Strict UTF-8 (a leading BOM is allowed and dropped): ``json.loads(body)`` would guess
        # UTF-16/32 and decode with ``surrogatepass``, letting a lone surrogate past the check
        # below (a 500 in the neuron). JSON on the wire is UTF-8 (RFC 8259); OpenAI says so too.
        data = json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) is not None:
        _refuse_lone_surrogates(data)
    return data


def _refuse_lone_surrogates(data: dict[str, Any]) -> None:
    """A typed 400 for a string (or key) holding half a surrogate pair.

    Why refuse rather than repair: ``"a\\ud800b"`` is valid JSON but not valid Unicode, so no
    tokenizer, log line or response body can encode it (it was a ``UnicodeEncodeError`` and a
    500 deep inside the neuron). The OpenAI and Anthropic APIs answer 400 for it too ("no low
    surrogate in string"), and quietly replacing it would change the prompt behind the client's
    back. A correctly paired escape (``\\ud83d\\ude00``, how ``json.dumps`` writes an emoji)
    decodes to one character and passes. Checked here, where every JSON body of the gateway and
    the neuron is parsed, so no route can forget it.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            match = _SURROGATE.search(value)
            if match is not None:
                raise ApiError(
                    400,
                    "invalid_json",
                    f"request body is not valid Unicode: a lone surrogate "
                    f"(\\u{ord(match.group()):04x}) in {where or 'the body'}; escape a character "
                    "outside the BMP as a surrogate pair or send it as UTF-8",
                    param=where or None,
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if _SURROGATE.search(key) is not None:
                    stack.append((where or "a key", key))
                else:
                    stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def install_error_handlers(
    app: FastAPI, dialect_for_path: DialectForPath = default_dialect
) -> None:
    """Every error leaves as an envelope in the route's dialect; unexpected ones are logged."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        response = error_response(exc, dialect_for_path(request.url.path))
        if exc.status == 413:
            # The rest of the body is still on the wire (a chunked body is cut at the first
            # byte over the limit): this connection cannot carry another request.
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail) if exc.detail else code
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(
            ApiError(exc.status_code, code, message), dialect_for_path(request.url.path)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        error = ApiError(
            400, "invalid_request", f"invalid request: {first.get('msg', exc)}", param=param
        )
        return error_response(error, dialect_for_path(request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        error = ApiError(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
        )
        return error_response(error, dialect_for_path(request.url.path))
