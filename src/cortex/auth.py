"""API keys for the gateway and the shared gateway <-> neuron token.

Why it looks like this:

- Keys are random tokens made by ``cortex keys new`` (256 bits), so a plain SHA-256 is the right
  hash at rest: nobody can brute-force a 256-bit secret, and a fast hash lets every request be
  checked against every key without a slow KDF on the hot path (GitHub and Stripe tokens work the
  same way). A key file therefore holds ``sha256:<hex>`` lines, never keys.
- Presented keys are hashed and compared with :func:`hmac.compare_digest` against *every* stored
  hash, without stopping at the first match, so timing says nothing about which key (or which
  prefix) matched.
- Keys held in an env var are hashed as they are read; only hashes stay in memory, so a debug
  dump of the config or the key set cannot show a key.
- The gateway sends neurons its own token in ``X-Cortex-Token`` and never forwards a client's
  credentials upstream: a neuron (or its logs) never sees a client key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cortex.config import AuthSection, ConfigError
from cortex.wire.asgi import scope_headers, send_error
from cortex.wire.errors import ApiError
from cortex.wire.http import DialectForPath, default_dialect

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
KEY_PREFIX = "ck-"
NEURON_TOKEN_HEADER = "x-cortex-token"
# Headers that carry a credential: stripped from anything the gateway forwards to a neuron.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", NEURON_TOKEN_HEADER})
# Routes every caller may use without a key (load balancers and probes).
OPEN_PATHS = frozenset({"/health"})
ADMIN_PREFIX = "/admin"


# ---- keys and hashes ----------------------------------------------------------------------------


def new_key() -> str:
    """A fresh API key: ``ck-`` and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The line a key file stores for ``key``: ``sha256:<64 hex digits>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeySet:
    """Digests of the accepted keys; :meth:`matches` is constant-time over the whole set."""

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self._digests = tuple(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:  # never print digests either: they identify keys
        return f"KeySet({len(self._digests)} keys)"

    def matches(self, presented: str | None) -> bool:
        if presented is None or not self._digests:
            return False
        digest = _digest(presented)
        found = False
        for stored in self._digests:
            found |= hmac.compare_digest(digest, stored)
        return found

    def union(self, other: KeySet) -> KeySet:
        return KeySet((*self._digests, *other._digests))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> KeySet:
        return cls(_digest(k) for k in keys)


def read_key_file(path: Path) -> list[bytes]:
    """Digests from a key file: one ``sha256:<hex>`` per line, optionally followed by a label;
    blank lines and ``#`` comments are skipped. A line that is not a hash is refused (naming the
    line number, never its content: it may be a key pasted by mistake)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the key file ({exc.strerror})") from None
    digests = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        token = entry.split()[0]
        hex_part = token[len(HASH_PREFIX) :] if token.startswith(HASH_PREFIX) else ""
        try:
            digest = bytes.fromhex(hex_part)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(
                f"{path}: line {number} is not a 'sha256:<64 hex digits>' hash "
                "(store hashes, not keys: see 'cortex keys hash')"
            )
        digests.append(digest)
    return digests


def load_key_set(
    env_name: str | None,
    file_name: str | None,
    environ: Mapping[str, str],
    base_dir: Path,
    what: str,
) -> KeySet:
    """Keys from an env var (comma- or newline-separated) and/or a key file of hashes."""
    digests: list[bytes] = []
    if env_name:
        value = environ.get(env_name)
        if value is None:
            raise ConfigError(f"[auth] {what}: the environment variable {env_name} is not set")
        keys = [k.strip() for k in value.replace("\n", ",").split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"[auth] {what}: the environment variable {env_name} is empty")
        digests.extend(_digest(k) for k in keys)
    if file_name:
        path = Path(file_name).expanduser()
        digests.extend(read_key_file(path if path.is_absolute() else base_dir / path))
    return KeySet(digests)


def read_token(env_name: str | None, environ: Mapping[str, str], where: str) -> str | None:
    """The shared gateway <-> neuron token named by ``env_name`` (None when not configured)."""
    if not env_name:
        return None
    token = environ.get(env_name, "").strip()
    if not token:
        raise ConfigError(f"{where}: the environment variable {env_name} is not set or empty")
    return token


# ---- what a request presents --------------------------------------------------------------------


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (the SDKs send these)."""
    value = headers.get("authorization")
    if value:
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


def without_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` minus every credential header (what the gateway may forward upstream)."""
    return {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}


# ---- the gateway's guard ------------------------------------------------------------------------


class GatewayAuth:
    """What the gateway accepts: client keys, admin keys, or nothing (auth off)."""

    def __init__(self, client_keys: KeySet, admin_keys: KeySet, required: bool) -> None:
        self.client_keys = client_keys
        self.admin_keys = admin_keys
        self.required = required

    @property
    def enabled(self) -> bool:
        return self.required or bool(self.client_keys) or bool(self.admin_keys)

    @classmethod
    def from_config(
        cls, section: AuthSection, base_dir: Path, environ: Mapping[str, str] | None = None
    ) -> GatewayAuth:
        environ = os.environ if environ is None else environ
        client = load_key_set(section.keys_env, section.keys_file, environ, base_dir, "keys")
        admin = load_key_set(
            section.admin_keys_env, section.admin_keys_file, environ, base_dir, "admin keys"
        )
        required = bool(section.required) or bool(client) or bool(admin)
        if section.required and not client and not admin:
            raise ConfigError(
                "[auth] required = true but no keys are configured "
                "(set keys_env or keys_file, see docs/security.md)"
            )
        return cls(client, admin, required)

    def check(self, path: str, headers: Mapping[str, str]) -> ApiError | None:
        """None when the request may go on, else the error to answer."""
        if not self.enabled or path in OPEN_PATHS:
            return None
        key = presented_key(headers)
        is_admin_route = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        if self.admin_keys.matches(key):
            return None
        if is_admin_route:
            if self.client_keys.matches(key):
                return ApiError(
                    403, "admin_key_required", "this route needs an admin key, not an API key"
                )
            return ApiError(
                401,
                "invalid_api_key",
                "missing or invalid admin key (send an admin key "
                "as 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
            )
        if self.client_keys.matches(key):
            return None
        if key is None:
            message = "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        else:
            message = "invalid API key"
        return ApiError(401, "invalid_api_key", message)


class AuthMiddleware:
    """ASGI middleware answering 401/403 in the route's envelope before the app sees a request.
    A plain ASGI class (not ``BaseHTTPMiddleware``, which breaks long streams)."""

    def __init__(
        self,
        app: Any,
        auth: GatewayAuth,
        dialect_for_path: DialectForPath = default_dialect,
    ) -> None:
        self.app = app
        self.auth = auth
        self.dialect_for_path = dialect_for_path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self.auth.check(scope["path"], scope_headers(scope))
            if error is not None:
                extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
                await send_error(send, error, self.dialect_for_path(scope["path"]), extra)
                return
        await self.app(scope, receive, send)


# ---- the neuron's guard -------------------------------------------------------------------------


class NeuronTokenMiddleware:
    """On a neuron with a token: every route but ``/health`` needs it, in ``X-Cortex-Token`` or
    ``Authorization: Bearer``. The token is compared in constant time."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.keys = KeySet.from_keys([token])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = scope_headers(scope)
            presented = headers.get(NEURON_TOKEN_HEADER) or presented_key(headers)
            if not self.keys.matches(presented):
                error = ApiError(
                    401,
                    "invalid_neuron_token",
                    "this neuron needs the shared cluster token (X-Cortex-Token)",
                )
                await send_error(send, error, "openai", {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class MetricsTokenMiddleware:
    """The gateway's metrics listener with ``[auth] metrics_token_env`` set: every request needs
    ``Authorization: Bearer TOKEN`` (what Prometheus sends from ``credentials_file``)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.keys = KeySet.from_keys([token])

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.keys.matches(presented_key(scope_headers(scope))):
            error = ApiError(
                401, "invalid_metrics_token", "this metrics port needs its bearer token"
            )
            await send_error(send, error, "openai", {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


# ---- exposure -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(
    host: str,
    auth: GatewayAuth,
    metrics_host: str | None = None,
    metrics_token: bool = False,
) -> bool:
    """Log a loud warning when a non-loopback listener is open to anyone: the API without keys,
    or the metrics port without ``metrics_token_env``. True when it warned."""
    api_open = not auth.enabled and not is_loopback(host)
    metrics_open = metrics_host is not None and not metrics_token and not is_loopback(metrics_host)
    if not (api_open or metrics_open):
        return False
    banner = "!" * 78
    lines = []
    if api_open:
        lines.append(
            f"AUTH IS OFF on a non-loopback listener ({host}): anyone who can reach this port "
            "can\nuse and load models. Set [auth] keys_env or keys_file in cortex.toml "
            "(docs/security.md)."
        )
    if metrics_open:
        lines.append(
            f"THE METRICS PORT IS OPEN on a non-loopback listener ({metrics_host}): anyone who "
            "can\nreach it reads model names, node names and traffic. Set [auth] "
            "metrics_token_env, or\nlisten on 127.0.0.1 (docs/security.md)."
        )
    log.warning("\n%s\n%s\n%s", banner, "\n".join(lines), banner)
    return True
