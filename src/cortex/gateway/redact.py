"""What a client may see of an error: what went wrong, without the fleet's insides.

Errors from a neuron (a failed load, a registry that is down) and from the gateway's own calls to
neurons carry what an operator needs: registry URLs, cache paths, neuron addresses and the
underlying exception. A client needs none of it, and each is a map of the private network or
the machines' file systems. So every message on its way to a client passes :func:`public`:
URLs, absolute paths and host addresses become placeholders, and so do they in ``details``,
where keys that only locate things (a registry ``endpoint``) are dropped. The full
error stays where operators look: the gateway's log (every failed load and unreachable neuron is
logged with it) and the admin API (``/admin/status`` and ``/admin/models`` show failed loads
unredacted). Stable fields (status, ``code``, ``param``, Retry-After) are never touched.
"""

from __future__ import annotations

import re
from typing import Any

from cortex.wire.errors import ApiError

# scheme://anything up to whitespace, a quote or a closing bracket
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]]*[^\s'\"<>()\[\].,:;]")
# /an/absolute/path or ~/a/path of two segments or more (a lone "/x" is usually a route).
_PATH = re.compile(r"(?<![\w.:/~])(?:~/|/)(?:[^\s/'\"<>()\[\],:;]+/)+[^\s/'\"<>()\[\],:;]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"<>()\[\],;]*")
# 10.0.0.5, 10.0.0.5:8000, ('10.0.0.5', 8000), [::1]:8000
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_IPV4_TUPLE = re.compile(r"\('\d{1,3}(?:\.\d{1,3}){3}', \d+\)")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*\](?::\d+)?")
# aiohttp: "Cannot connect to host neuron-a.lan:8000 ssl:default [...]"
_HOST_PORT = re.compile(r"(?<=host )[A-Za-z0-9.-]+:\d+")

ROUTES = ("/v1/", "/models", "/admin/", "/health", "/metrics", "/tokenize", "/discovery")


def _path(match: re.Match[str]) -> str:
    text = match.group()
    return text if text.startswith(ROUTES) else "[path]"


def public_message(message: str) -> str:
    """``message`` without URLs, file system paths or host addresses."""
    text = _URL.sub("[url]", message)
    text = _WINDOWS_PATH.sub("[path]", text)
    text = _PATH.sub(_path, text)
    text = _IPV4_TUPLE.sub("[host]", text)
    text = _IPV6.sub("[host]", text)
    text = _HOST_PORT.sub("[host]", text)
    return _IPV4.sub("[host]", text)


# ``details`` keys that only ever locate things (a source error's registry endpoint).
_LOCATING_KEYS = frozenset({"endpoint", "url", "cache_dir", "path", "snapshot", "local_path"})


def public_details(value: Any) -> Any:
    """``details`` with locating keys dropped and every string redacted (a neuron's own fields,
    such as a device name and the bytes a load needs, stay: a client can act on them)."""
    if isinstance(value, str):
        return public_message(value)
    if isinstance(value, dict):
        return {k: public_details(v) for k, v in value.items() if str(k) not in _LOCATING_KEYS}
    if isinstance(value, list):
        return [public_details(v) for v in value]
    return value


def public(error: ApiError) -> ApiError:
    """A copy of ``error`` fit for a client (see the module docstring)."""
    message = public_message(error.message)
    details = public_details(error.details) if error.details else None
    if message == error.message and details == error.details:
        return error
    copy = ApiError(
        error.status,
        error.code,
        message,
        param=error.param,
        retry_after=error.retry_after,
        details=details or None,
        error_type=error.error_type,
    )
    if hasattr(error, "never_connected"):  # a flag the proxy sets on the original
        copy.never_connected = error.never_connected  # type: ignore[attr-defined]
    return copy
