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

import attrs

from cortex.config import AuthSection, ConfigError
from cortex.keyfile import HASH_PREFIX, ApiKey, KeyEntry, check_consistent, read_key_file, unnamed
from cortex.wire.asgi import scope_headers, send_error
from cortex.wire.errors import ApiError
from cortex.wire.http import DialectForPath, default_dialect

log = logging.getLogger(__name__)

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
    """Digests of the accepted keys, each with who it is (:class:`ApiKey`); :meth:`identify`
    is constant-time over the whole set."""

    def __init__(self, digests: Iterable[bytes] = (), keys: Iterable[ApiKey] | None = None) -> None:
        self._digests = tuple(digests)
        self._keys = (
            tuple(keys) if keys is not None else tuple(ApiKey(unnamed(d)) for d in self._digests)
        )
        if len(self._keys) != len(self._digests):
            raise ValueError("one ApiKey per digest")

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:  # never print digests either: they identify keys
        return f"KeySet({len(self._digests)} keys)"

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return self._keys

    def identify(self, presented: str | None) -> ApiKey | None:
        """Who ``presented`` is, or None. Every stored digest is compared (no early exit), so
        timing says nothing about which key matched or how much of one."""
        if presented is None or not self._digests:
            return None
        digest = _digest(presented)
        found = -1
        for index, stored in enumerate(self._digests):
            if hmac.compare_digest(digest, stored):
                found = index
        return self._keys[found] if found >= 0 else None

    def matches(self, presented: str | None) -> bool:
        return self.identify(presented) is not None

    def union(self, other: KeySet) -> KeySet:
        return KeySet((*self._digests, *other._digests), (*self._keys, *other._keys))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> KeySet:
        return cls(_digest(k) for k in keys)

    @classmethod
    def from_named(cls, keys: Mapping[str, ApiKey]) -> KeySet:
        """Keys (the secrets) with who each is: for tests and embedding."""
        return cls((_digest(k) for k in keys), keys.values())

    @classmethod
    def from_entries(cls, entries: Iterable[KeyEntry]) -> KeySet:
        listed = list(entries)
        return cls((e.digest for e in listed), (e.key for e in listed))


def load_key_set(
    env_name: str | None,
    file_name: str | None,
    environ: Mapping[str, str],
    base_dir: Path,
    what: str,
    admin: bool = False,
) -> KeySet:
    """Keys from an env var (comma- or newline-separated; unnamed) and/or a key file of hashes
    with names and limits (:mod:`cortex.keyfile`)."""
    entries: list[KeyEntry] = []
    if env_name:
        value = environ.get(env_name)
        if value is None:
            raise ConfigError(f"[auth] {what}: the environment variable {env_name} is not set")
        keys = [k.strip() for k in value.replace("\n", ",").split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"[auth] {what}: the environment variable {env_name} is empty")
        for k in keys:
            digest = _digest(k)
            entries.append(KeyEntry(digest, ApiKey(unnamed(digest), admin=admin)))
    if file_name:
        path = Path(file_name).expanduser()
        entries.extend(read_key_file(path if path.is_absolute() else base_dir / path, admin))
    return KeySet.from_entries(entries)


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
    """What the gateway accepts: client keys, admin keys, or nothing (auth off). Each key has a
    name and limits (:mod:`cortex.keyfile`); :meth:`authenticate` says who a request is."""

    def __init__(self, client_keys: KeySet, admin_keys: KeySet, required: bool) -> None:
        self.client_keys = client_keys
        self.admin_keys = admin_keys
        self.required = required
        # One pass over every digest per request: admin keys first (an admin key that is also
        # listed as a client key is an admin key).
        admin = KeySet(admin_keys._digests, (attrs.evolve(k, admin=True) for k in admin_keys.keys))
        self._all = admin.union(client_keys)
        check_consistent(
            KeyEntry(d, k) for d, k in zip(self._all._digests, self._all.keys, strict=True)
        )

    @property
    def enabled(self) -> bool:
        return self.required or bool(self.client_keys) or bool(self.admin_keys)

    def key_names(self) -> list[str]:
        """Every configured key name (the bounded values of the ``key`` metric label)."""
        return sorted({k.name for k in self._all.keys})

    def accounts(self) -> dict[str, ApiKey]:
        """One :class:`ApiKey` per name (lines sharing a name are one account)."""
        found: dict[str, ApiKey] = {}
        for key in self._all.keys:
            found.setdefault(key.name, key)
        return found

    @classmethod
    def from_config(
        cls, section: AuthSection, base_dir: Path, environ: Mapping[str, str] | None = None
    ) -> GatewayAuth:
        environ = os.environ if environ is None else environ
        client = load_key_set(section.keys_env, section.keys_file, environ, base_dir, "keys")
        admin = load_key_set(
            section.admin_keys_env,
            section.admin_keys_file,
            environ,
            base_dir,
            "admin keys",
            admin=True,
        )
        required = bool(section.required) or bool(client) or bool(admin)
        if section.required and not client and not admin:
            raise ConfigError(
                "[auth] required = true but no keys are configured "
                "(set keys_env or keys_file, see docs/security.md)"
            )
        return cls(client, admin, required)

    def authenticate(self, path: str, headers: Mapping[str, str]) -> ApiKey | ApiError | None:
        """Who the request is (its :class:`ApiKey`), the error to answer, or None when auth is
        off or the path is open."""
        if not self.enabled or path in OPEN_PATHS:
            return None
        presented = presented_key(headers)
        key = self._all.identify(presented)
        is_admin_route = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        if key is not None and (key.admin or not is_admin_route):
            return key
        if is_admin_route:
            if key is not None:
                return ApiError(
                    403, "admin_key_required", "this route needs an admin key, not an API key"
                )
            return ApiError(
                401,
                "invalid_api_key",
                "missing or invalid admin key (send an admin key "
                "as 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
            )
        if presented is None:
            message = "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        else:
            message = "invalid API key"
        return ApiError(401, "invalid_api_key", message)

    def check(self, path: str, headers: Mapping[str, str]) -> ApiError | None:
        """None when the request may go on, else the error to answer."""
        found = self.authenticate(path, headers)
        return found if isinstance(found, ApiError) else None


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
