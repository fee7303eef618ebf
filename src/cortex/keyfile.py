"""Key files: one hashed key per line, with the key's name and what it may do.

A line is ``sha256:<64 hex> [NAME] [attribute=value ...] [# comment]``::

    sha256:5f1c...  alice  models=qwen,acme/echo  rpm=60  tpm=20000  budget_tokens=1000000  per=day
    sha256:9a0b...  ci-bot rpm=600
    sha256:77e2...                                   # an unnamed key (named key-77e2...)

Why a line and not a TOML table: key files predate names, are appended to by ``cortex keys new
--key-file`` and by shell scripts (``cortex keys hash >> keys.txt``), and a line per key keeps
a key and everything about it together when a line is removed to revoke it.

- The name (the first word without ``=``) is what the request log, the ``key`` label of the
  metrics, ``cortex status`` and ``cortex usage`` show: never the key, never its hash. It must be
  a short identifier (it becomes a metric label). Further words without ``=`` are a free-text
  note (older key files wrote a label there) and are ignored; so is a first word that is not a
  name (an older label such as ``alice's``): that key is unnamed.
- A key without a name is named ``key-`` and the first 8 hex digits of its hash, so an operator
  can find its line (``grep sha256:77e2 keys.txt``); the hash of a 256-bit random key gives
  nothing away.
- Several lines may share a name (a key being rotated: old and new work side by side); they are
  one account with one set of limits, so their attributes must agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import attrs

from cortex.config import ConfigError

HASH_PREFIX = "sha256:"
PERIODS = ("day", "month")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_MODEL_PATTERN = re.compile(r"[^\s,=#]+")


@attrs.frozen
class KeyLimits:
    """What a key may do: which models (empty: any), requests and tokens per minute, and a
    token budget per ``day`` or ``month`` (UTC). None: no limit."""

    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    budget_tokens: int | None = None
    per: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.budget_tokens is None) != (self.per is None):
            raise ValueError("budget_tokens and per go together (per=day or per=month)")
        if self.per is not None and self.per not in PERIODS:
            raise ValueError(f"per must be day or month, not {self.per!r}")
        for name, value in (
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("budget_tokens", self.budget_tokens),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    @property
    def limited(self) -> bool:
        """Whether any rate or budget applies (the model list aside)."""
        return self.rpm is not None or self.tpm is not None or self.budget_tokens is not None

    @property
    def meters_tokens(self) -> bool:
        """Whether the key's tokens are counted as they stream (a tpm or a budget)."""
        return self.tpm is not None or self.budget_tokens is not None

    def attributes(self) -> list[str]:
        """The ``attribute=value`` words of a key-file line (in the documented order)."""
        words = []
        if self.models:
            words.append("models=" + ",".join(self.models))
        for name in ("rpm", "tpm", "budget_tokens", "per"):
            value = getattr(self, name)
            if value is not None:
                words.append(f"{name}={value}")
        return words

    def to_json(self) -> dict[str, object]:
        return {
            "models": list(self.models) or None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget_tokens": self.budget_tokens,
            "per": self.per,
        }


@attrs.frozen
class ApiKey:
    """Who a presented key is: its name, its limits, and whether it is an admin key."""

    name: str
    limits: KeyLimits = KeyLimits()
    admin: bool = False


@attrs.frozen
class KeyEntry:
    """One line of a key file: the key's SHA-256 digest and who it is."""

    digest: bytes
    key: ApiKey


def unnamed(digest: bytes) -> str:
    """The name of a key whose line gives none."""
    return "key-" + digest.hex()[:8]


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name[:80]!r} is not a key name (1-64 of letters, digits, '.', '_', '@', '-', "
            "starting with a letter or digit)"
        )
    return name


def _int(name: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number, got {value[:40]!r}")
    return int(value)


def parse_limits(attributes: dict[str, str]) -> KeyLimits:
    """``KeyLimits`` from a line's ``attribute=value`` words (unknown ones refused)."""
    known = {"models", "rpm", "tpm", "budget_tokens", "per"}
    unknown = sorted(set(attributes) - known)
    if unknown:
        raise ValueError(
            f"unknown attribute {unknown[0][:40]!r} (known: budget_tokens, models, per, rpm, tpm)"
        )
    models: tuple[str, ...] = ()
    if "models" in attributes:
        models = tuple(m for m in attributes["models"].split(",") if m)
        if not models or not all(_MODEL_PATTERN.fullmatch(m) for m in models):
            raise ValueError("models must be a comma-separated list of model ids or aliases")
    return KeyLimits(
        models=models,
        rpm=_int("rpm", attributes["rpm"]) if "rpm" in attributes else None,
        tpm=_int("tpm", attributes["tpm"]) if "tpm" in attributes else None,
        budget_tokens=(
            _int("budget_tokens", attributes["budget_tokens"])
            if "budget_tokens" in attributes
            else None
        ),
        per=attributes.get("per"),
    )


def parse_line(entry: str) -> tuple[bytes, str | None, KeyLimits] | None:
    """(digest, name or None, limits) of a key-file line without its comment; None when the
    line is blank. ``ValueError`` says what is wrong, never quoting the first word (it may be a
    key pasted by mistake)."""
    words = entry.split()
    if not words:
        return None
    token = words[0]
    hex_part = token[len(HASH_PREFIX) :] if token.startswith(HASH_PREFIX) else ""
    try:
        digest = bytes.fromhex(hex_part)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(
            "not a 'sha256:<64 hex digits>' hash (store hashes, not keys: see 'cortex keys hash')"
        )
    name: str | None = None
    note = False
    attributes: dict[str, str] = {}
    for word in words[1:]:
        attr, sep, value = word.partition("=")
        if sep:
            if attr in attributes:
                raise ValueError(f"attribute {attr[:40]!r} given twice")
            attributes[attr] = value
        elif name is None and not attributes and not note:
            if NAME_PATTERN.fullmatch(word):
                name = word
            else:  # an older free-text label: the key stays unnamed
                note = True
        # further bare words: a free-text note (older files wrote a label there)
    return digest, name, parse_limits(attributes)


def read_key_file(path: Path, admin: bool = False) -> list[KeyEntry]:
    """The entries of a key file; a line that is not one is refused, naming its number (never
    its content: it may be a key pasted by mistake)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the key file ({exc.strerror})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_line(line.split("#", 1)[0])
        except ValueError as exc:
            raise ConfigError(f"{path}: line {number}: {exc}") from None
        if parsed is None:
            continue
        digest, name, limits = parsed
        entries.append(KeyEntry(digest, ApiKey(name or unnamed(digest), limits, admin)))
    return entries


def check_consistent(entries: Iterable[KeyEntry]) -> None:
    """Lines sharing a name are one account: their limits must agree."""
    seen: dict[str, KeyLimits] = {}
    for entry in entries:
        key = entry.key
        other = seen.setdefault(key.name, key.limits)
        if other != key.limits:
            raise ConfigError(
                f"[auth] the key name {key.name!r} is on several lines with different limits "
                "(lines sharing a name are one account: give them the same attributes)"
            )


def format_line(hashed: str, name: str | None, limits: KeyLimits, note: str = "") -> str:
    """The key-file line ``cortex keys new`` prints (and appends with ``--key-file``)."""
    words = [hashed, *([name] if name else []), *limits.attributes()]
    line = " ".join(words)
    return f"{line}  # {note}" if note else line
