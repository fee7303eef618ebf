"""Model ids and the contract between the neuron and model-source plugins.

A model id names an artefact in one registry: ``scheme:org/name`` or a bare ``org/name`` that takes
the configured default scheme. The same ``org/name`` on two registries is two different artefacts,
so the scheme is part of the identity and of the cache namespace.

Ids end up in URLs and in cache paths, so parsing is strict: anything that could escape a cache
directory or change the meaning of a URL is refused here, once, instead of in every plugin.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

# --------------------------------------------------------------------------------------------
# Parse errors: one class per case, all subclasses of one base, each quoting the input.
# --------------------------------------------------------------------------------------------


QUOTE_MAX = 200


class ModelIdError(ValueError):
    """A model id that cannot be parsed. ``code`` is a stable machine-readable name."""

    code = "invalid_model_id"
    reason = "is not a valid model id"

    def __init__(self, raw: str) -> None:
        self.raw = raw
        # Quoted back so the client sees what was wrong, but never a megabyte of it.
        shown = repr(raw) if len(raw) <= QUOTE_MAX else f"{raw[:QUOTE_MAX]!r}... ({len(raw)} chars)"
        super().__init__(
            f"model id {shown} {self.reason} (expected 'scheme:org/name' or 'org/name')"
        )


class EmptyModelIdError(ModelIdError):
    code = "empty_model_id"
    reason = "is empty"


class EmptySchemeError(ModelIdError):
    code = "empty_scheme"
    reason = "has an empty scheme before ':'"


class SchemeContainsSlashError(ModelIdError):
    code = "scheme_contains_slash"
    reason = "has a '/' in its scheme (the part before the first ':')"


class MissingSlashError(ModelIdError):
    code = "missing_slash"
    reason = "has no '/' between org and name"


class EmptyOrgError(ModelIdError):
    code = "empty_org"
    reason = "has an empty org before '/'"


class EmptyNameError(ModelIdError):
    code = "empty_name"
    reason = "has an empty name after '/'"


class NameContainsColonError(ModelIdError):
    code = "name_contains_colon"
    reason = "has a ':' in its name"


class UnsafeModelIdError(ModelIdError):
    """An id that could escape a cache directory or confuse a URL."""

    code = "unsafe_model_id"

    def __init__(self, raw: str, why: str) -> None:
        self.reason = f"is unsafe: {why}"
        super().__init__(raw)


class NameContainsSlashError(ModelIdError):
    code = "name_contains_slash"
    reason = "has a '/' in its name (a registry repo is exactly 'org/name')"


class InvalidRepoNameError(ModelIdError):
    """An org or name the registry wire format cannot express (see :data:`REPO_PART`)."""

    code = "invalid_repo_name"

    def __init__(self, raw: str, why: str) -> None:
        self.reason = f"is not a valid registry repo: {why}"
        super().__init__(raw)


class InvalidSchemeError(ModelIdError):
    code = "invalid_scheme"

    def __init__(self, raw: str, why: str) -> None:
        self.reason = f"has an invalid scheme: {why}"
        super().__init__(raw)


_FORBIDDEN_CHARS = re.compile(r"[\s\x00-\x1f\x7f\\?#]")

# The repo grammar of the HF wire format, which every source speaks (huggingface_hub's
# ``validate_repo_id``, narrowed to ASCII): an org and a name of letters, digits, '-', '_' and
# '.', each starting and ending with a letter, digit or '_', no '--' or '..' (the cache folder
# ``models--org--name`` would be ambiguous), no '.git' suffix, at most 96 characters. Checked
# here so an id the registry cannot express is a 400 at every entry point instead of a
# registry error (or a retryable 503) after a round trip.
REPO_PART_MAX = 96
REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_REPO_PART_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
# Schemes name ``[sources.<scheme>]`` tables and cache folders: ASCII, like a TOML bare key.
SCHEME_MAX = 64
SCHEME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _check_safe(raw: str, scheme: str | None, org: str, name: str) -> None:
    if raw.startswith("/") or org.startswith("/"):
        raise UnsafeModelIdError(raw, "it starts with '/'")
    match = _FORBIDDEN_CHARS.search(raw)
    if match:
        raise UnsafeModelIdError(
            raw,
            f"it contains {match.group()!r} (whitespace, control characters, '\\', '?' "
            "and '#' are not allowed)",
        )
    for segment in [org, *name.split("/")]:
        if segment in (".", ".."):
            raise UnsafeModelIdError(raw, f"it contains a {segment!r} path segment")
        if segment == "":
            raise UnsafeModelIdError(raw, "it contains an empty path segment ('//')")
    if scheme in (".", ".."):
        raise UnsafeModelIdError(raw, f"its scheme is {scheme!r}")


def _check_grammar(raw: str, scheme: str | None, org: str, name: str) -> None:
    """What a registry can express (after :func:`_check_safe`, which names the unsafe cases)."""
    if scheme is not None:
        if len(scheme) > SCHEME_MAX:
            raise InvalidSchemeError(raw, f"longer than {SCHEME_MAX} characters")
        if SCHEME.fullmatch(scheme) is None:
            raise InvalidSchemeError(
                raw, "only ASCII letters, digits, '_' and '-' (not first) are allowed"
            )
    if "/" in name:
        raise NameContainsSlashError(raw)
    for label, part in (("org", org), ("name", name)):
        if len(part) > REPO_PART_MAX:
            raise InvalidRepoNameError(
                raw, f"its {label} is longer than {REPO_PART_MAX} characters"
            )
        bad = _REPO_PART_CHARS.search(part)
        if bad is not None:
            raise InvalidRepoNameError(
                raw,
                f"its {label} contains {bad.group()!r} (only ASCII letters, digits, '-', '_' "
                "and '.' are allowed)",
            )
        if REPO_PART.fullmatch(part) is None:
            raise InvalidRepoNameError(
                raw, f"its {label} must start and end with a letter, a digit or '_'"
            )
        if "--" in part or ".." in part:
            raise InvalidRepoNameError(raw, f"its {label} contains '--' or '..'")
    if name.endswith(".git"):
        raise InvalidRepoNameError(raw, "its name ends with '.git'")


@attrs.frozen
class ModelSourceId:
    """A parsed model id. ``scheme`` is None for a bare ``org/name``.

    ``str()`` gives back exactly the form that was parsed, so ids round-trip through configs,
    URLs and logs; :meth:`with_default_scheme` makes a bare id canonical.
    """

    scheme: str | None
    org: str
    name: str

    @classmethod
    def parse(cls, raw: str) -> ModelSourceId:
        """Parse ``scheme:org/name`` or ``org/name``; the first failing check wins (see docs)."""
        if not isinstance(raw, str) or raw == "":
            raise EmptyModelIdError("" if not isinstance(raw, str) else raw)
        scheme: str | None = None
        rest = raw
        if ":" in raw:
            scheme, rest = raw.split(":", 1)
            if scheme == "":
                raise EmptySchemeError(raw)
            if "/" in scheme:
                raise SchemeContainsSlashError(raw)
        if "/" not in rest:
            raise MissingSlashError(raw)
        org, name = rest.split("/", 1)
        if org == "":
            raise EmptyOrgError(raw)
        if name == "":
            raise EmptyNameError(raw)
        if ":" in name:
            raise NameContainsColonError(raw)
        _check_safe(raw, scheme, org, name)
        _check_grammar(raw, scheme, org, name)
        return cls(scheme=scheme, org=org, name=name)

    @property
    def repo_path(self) -> str:
        """What a registry is asked for: always ``org/name``, never the scheme."""
        return f"{self.org}/{self.name}"

    @property
    def is_bare(self) -> bool:
        return self.scheme is None

    def with_default_scheme(self, default: str) -> ModelSourceId:
        """Give a bare id the default scheme; an explicit scheme is never overridden."""
        if self.scheme is not None:
            return self
        return attrs.evolve(self, scheme=default)

    def __str__(self) -> str:
        if self.scheme is None:
            return self.repo_path
        return f"{self.scheme}:{self.repo_path}"


def canonical_model_id(raw: str, default_scheme: str) -> str:
    """Parse ``raw`` and return its ``scheme:org/name`` form (raises :class:`ModelIdError`)."""
    return str(ModelSourceId.parse(raw).with_default_scheme(default_scheme))


# --------------------------------------------------------------------------------------------
# Source configuration and the plugin contract
# --------------------------------------------------------------------------------------------


@attrs.frozen
class SourceSettings:
    """The effective settings of one scheme: where its registry is, which env var holds its
    token (the *name*, never the secret) and where its cache lives."""

    scheme: str
    endpoint: str
    auth_env: str | None
    cache_dir: Path
    plugin: str


@attrs.frozen
class SourceDefaults:
    """What a source plugin proposes for a scheme nobody configured explicitly."""

    endpoint: str
    auth_env: str | None
    cache_dir: Path


@attrs.frozen
class RepoFile:
    """One file in a registry repo, as preflight saw it."""

    path: str
    size: int | None = None


class WeightFormat:
    """How a repo stores its weights (preflight's classification)."""

    GGUF = "gguf"
    SAFETENSORS = "safetensors"
    SAFETENSORS_SHARDED = "safetensors-sharded"
    BOTH = "both"
    NONE = "none"


@attrs.frozen
class Preflight:
    """The result of one registry round trip: what the repo holds, without downloading weights.

    ``files`` lists every file in the repo; ``gguf_file`` is set when a GGUF file was chosen for
    the requested quant; ``download_bytes`` is the size of what a fetch for the chosen harness
    would download.
    """

    model_id: str
    revision: str
    weight_format: str
    files: tuple[RepoFile, ...]
    gguf_file: str | None = None
    quants: tuple[str, ...] = ()
    download_bytes: int = 0

    def file_names(self) -> list[str]:
        return [f.path for f in self.files]

    def size_of(self, path: str) -> int:
        for f in self.files:
            if f.path == path:
                return f.size or 0
        return 0


class SourceError(Exception):
    """Base of every typed error a source raises. Each carries the scheme-qualified id exactly as
    configured and serialises to JSON with a ``kind`` field, so a neuron can hand it to the gateway
    and the gateway to a client without losing what went wrong."""

    kind = "source_error"
    http_status = 502

    def __init__(self, model_id: str, message: str, **details: Any) -> None:
        self.model_id = model_id
        self.message = message
        self.details = details
        super().__init__(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_id": self.model_id,
            "message": self.message,
            **self.details,
        }


class InvalidRepoIdError(SourceError):
    """The registry client refused the id itself (e.g. huggingface_hub's repo-id validation):
    the request is wrong, not the registry, so it is a 400 that retrying cannot fix."""

    kind = "invalid_repo_name"
    http_status = 400


class UnknownSchemeError(SourceError):
    kind = "unknown_scheme"
    http_status = 400


class RepoNotFoundError(SourceError):
    kind = "repo_not_found"
    http_status = 404


class UnauthorizedError(SourceError):
    kind = "unauthorized"
    http_status = 401


class NoLoadableWeightsError(SourceError):
    kind = "no_loadable_weights"
    http_status = 422


class QuantNotFoundError(SourceError):
    kind = "quant_not_found"
    http_status = 422


class RegistryUnreachableError(SourceError):
    kind = "registry_unreachable"
    http_status = 503


class FetchError(SourceError):
    kind = "fetch_failed"
    http_status = 502


ProgressCallback = Callable[[str, int, int | None], None]
"""``progress(file, bytes_done, bytes_total)`` — called while a fetch runs."""


@runtime_checkable
class ModelSource(Protocol):
    """A configured source for one scheme (made by a :class:`SourcePlugin` from its settings)."""

    settings: SourceSettings

    @property
    def has_token(self) -> bool:
        """Whether a token is configured (the token itself is never exposed)."""
        ...

    def preflight(self, model_id: ModelSourceId, quant: str | None = None) -> Preflight:
        """One registry round trip: does the repo exist, is auth ok, which weight files, how big.
        Raises :class:`SourceError` subclasses."""
        ...

    def fetch(
        self,
        model_id: ModelSourceId,
        files: list[str],
        progress: ProgressCallback | None = None,
        revision: str | None = None,
    ) -> Path:
        """Download ``files`` (or serve them from this source's own cache) and return the local
        snapshot directory that holds them. Never leaves a partial file that a later load trusts.

        ``revision`` (optional) pins the commit, e.g. ``preflight.revision``; by default a source
        uses the commit its latest preflight of this repo saw, else the repo's main branch."""
        ...


@runtime_checkable
class SourcePlugin(Protocol):
    """What ``cortex_register_sources`` registers: a factory for one or more schemes."""

    @property
    def name(self) -> str:
        """The plugin's name (what ``[sources.<scheme>] plugin`` names)."""
        ...

    @property
    def schemes(self) -> tuple[str, ...]:
        """The schemes it serves when nothing is configured."""
        ...

    def defaults(self, scheme: str) -> SourceDefaults:
        """Endpoint, token env var and cache dir for ``scheme`` when the operator set none."""
        ...

    def create(self, settings: SourceSettings) -> ModelSource:
        """Build a source for one configured scheme (no network here)."""
        ...
