"""The gateway's calls to a neuron's admin routes (load, unload, estimate, release memory).

An answer that is not a success becomes an :class:`ApiError` that keeps the neuron's status,
code, message and Retry-After, so a client sees what the neuron said, not a generic failure.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from cortex.wire.errors import ApiError

log = logging.getLogger(__name__)


def retry_after_of(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    timeout: aiohttp.ClientTimeout,
    *,
    retry_after: float = 5.0,
) -> dict[str, Any]:
    """POST JSON, return the JSON object answered with 200, else raise an :class:`ApiError`."""
    try:
        async with session.post(url, json=payload, timeout=timeout) as resp:
            raw = await resp.read()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = None
            if resp.status == 200 and isinstance(body, dict):
                return body
            if resp.status == 200:
                log.warning("%s answered 200 with a body that is not a JSON object", url)
                raise ApiError(
                    502,
                    "upstream_bad_answer",
                    "a neuron answered 200 with a body that is not a JSON object",
                    retry_after=retry_after,
                )
            error = ApiError.from_openai_body(resp.status, body, retry_after_of(resp.headers))
            if error.status >= 500 and error.retry_after is None:
                error.retry_after = retry_after
            raise error
    except (TimeoutError, aiohttp.ServerTimeoutError):
        log.warning("%s did not answer in time", url)
        raise ApiError(
            504, "upstream_timeout", "a neuron did not answer in time", retry_after=retry_after
        ) from None
    except aiohttp.ClientError as exc:
        # Clients hear what happened, not where (docs/security.md); the log has both.
        log.warning("could not reach %s: %s: %s", url, type(exc).__name__, exc)
        raise ApiError(
            502,
            "upstream_connection_error",
            f"could not reach a neuron ({type(exc).__name__})",
            retry_after=retry_after,
        ) from None
