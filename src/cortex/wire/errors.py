"""Typed API errors and their two envelopes.

Every error a client can see is an :class:`ApiError`: a status, a stable ``code``, a message that
says what to do, and ``Retry-After`` when trying again later can work. The same error renders as
the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` on OpenAI routes and as the
Anthropic envelope ``{"type": "error", "error": {"type", "message"}}`` on ``/v1/messages``.

Every rendered error also says whether retrying can help, in the headers the official SDKs and
Claude Code read before their own status rules: ``Retry-After`` (and ``x-should-retry: true``)
when it can, ``x-should-retry: false`` when the same request will fail the same way (a wrong
key, a bad body, an unknown model). Without the header the SDKs retry 408/409/429/5xx with
backoff, and Claude Code retried a wrong key for three minutes.
"""

from __future__ import annotations

import json
import math
from typing import Any

OPENAI = "openai"
ANTHROPIC = "anthropic"
# The header the official SDKs (and Claude Code) obey before their own retry rules.
SHOULD_RETRY = "x-should-retry"

# OpenAI error ``type`` for a status (what the official API sends).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# Anthropic error ``type`` for a status (the types the anthropic SDK maps to exceptions).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable code and an envelope for each dialect."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.details = details
        self.error_type = error_type

    @property
    def openai_type(self) -> str:
        return self.error_type or _OPENAI_TYPES.get(self.status, "server_error")

    @property
    def anthropic_type(self) -> str:
        return _ANTHROPIC_TYPES.get(self.status, "api_error")

    def openai_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.openai_type,
            "param": self.param,
            "code": self.code,
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def body(self, dialect: str = OPENAI) -> dict[str, Any]:
        return self.anthropic_body() if dialect == ANTHROPIC else self.openai_body()

    @property
    def retryable(self) -> bool | None:
        """True when the same request may succeed later (it carries ``Retry-After``), False
        when it cannot (a 4xx other than 408/409/429: the request itself is wrong), None when
        cortex cannot tell (a 5xx without ``Retry-After``: the client's own policy decides)."""
        if self.retry_after is not None:
            return True
        if 400 <= self.status < 500 and self.status not in (408, 409, 429):
            return False
        return None

    def headers(self) -> dict[str, str]:
        """``Retry-After`` / ``x-should-retry`` (see the module docstring)."""
        retryable = self.retryable
        if retryable is None:
            return {}
        if not retryable:
            return {SHOULD_RETRY: "false"}
        assert self.retry_after is not None
        # Rounded up, never to the nearest second: the SDKs wait exactly this long, and a
        # rate-limit bucket that has room in 2.4 s refused again a client told "2".
        seconds = max(1, math.ceil(self.retry_after - 1e-6))
        return {"Retry-After": str(seconds), SHOULD_RETRY: "true"}

    def to_bytes(self, dialect: str = OPENAI) -> bytes:
        return json.dumps(self.body(dialect)).encode()

    @classmethod
    def from_openai_body(cls, status: int, body: Any, retry_after: float | None = None) -> ApiError:
        """Rebuild an error from an upstream OpenAI envelope (code, message, Retry-After)."""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(
                status, "upstream_error", f"upstream answered {status}", retry_after=retry_after
            )
        return cls(
            status,
            str(error.get("code") or "upstream_error"),
            str(error.get("message") or f"upstream answered {status}"),
            param=error.get("param"),
            retry_after=retry_after,
            details=error.get("details"),
            error_type=error.get("type"),
        )


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> ApiError:
    return ApiError(400, code, message, param=param)


def model_not_found(model: str, detail: str = "") -> ApiError:
    message = f"model {model!r} not found"
    return ApiError(
        404, "model_not_found", f"{message}{': ' + detail if detail else ''}", param="model"
    )


def service_unavailable(
    message: str, retry_after: float = 5.0, code: str = "service_unavailable"
) -> ApiError:
    return ApiError(503, code, message, retry_after=retry_after)
