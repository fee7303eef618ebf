"""Per-key limits: which models a key may use, requests and tokens per minute, and a token
budget per day or month.

Why it looks like this:

- **Token buckets** for rates. A key with ``rpm = 60`` holds up to 60 requests and gets one back
  every second; ``tpm`` the same in tokens. A burst up to the limit is fine, a steady rate over
  it is not -- what OpenAI and Anthropic do, so clients' backoff logic fits.
- **Tokens are charged as they are known**, not guessed up front: the prompt when the neuron
  reports it, output tokens as they stream, the exact usage when the answer ends. A request is
  admitted while its key's token bucket is above zero, and may drive it below (a debt the next
  requests wait out). Guessing from ``max_tokens`` would refuse a key that asks for 32000 and
  uses 50 (Claude Code does exactly that).
- **Budgets** count every token (prompt + completion) in the current UTC day or month, across
  gateways when they share a PostgreSQL store: ``spent = base + pending``, where ``base`` is
  what the store holds for the period (every gateway's flushed usage, re-read at each sync) and
  ``pending`` what this gateway charged and has not written yet. A key over its budget gets 429
  ``budget_exceeded`` until the period resets; a stream that crosses it is ended cleanly
  (:func:`cortex.gateway.metering.metered`).
- **Shared rates.** Each gateway writes how many requests and tokens it took per key, as
  running totals; at each sync it reads the other gateways' totals and drains its own buckets by
  what they took since the last sync. Two gateways thus enforce one rate, give or take what
  arrives within one sync interval (``[usage] flush_interval``).
- Nothing here awaits: a decision and the bookkeeping it implies happen in one step on the
  event loop (as in :mod:`cortex.gateway.scheduler`).

Headers: every answer to a limited key carries its remaining allowance, in the form the
dialect's provider uses -- ``x-ratelimit-*`` on OpenAI routes, ``anthropic-ratelimit-*`` on
``/v1/messages`` -- plus ``x-cortex-budget-*`` for budgets (docs/security.md).
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cortex.keyfile import ApiKey, KeyLimits
from cortex.wire.errors import SHOULD_RETRY, ApiError

DAY = 86400.0


def period_bounds(per: str, now: float) -> tuple[float, float]:
    """The UTC ``day`` or ``month`` holding ``now``: (start, end) in unix time."""
    if per == "day":
        start = math.floor(now / DAY) * DAY
        return start, start + DAY
    moment = datetime.fromtimestamp(now, UTC)
    start = calendar.timegm((moment.year, moment.month, 1, 0, 0, 0))
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_duration(seconds: float) -> str:
    """``1m30s``, ``2.5s``, ``250ms``: how OpenAI writes ``x-ratelimit-reset-*``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class TokenBucket:
    """``per_minute`` units, refilled continuously; the level may go below zero (a debt)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until the level reaches ``amount`` (0 when it has)."""
        level = self.refill(now)
        return 0.0 if level >= amount else (amount - level) / self.rate

    def full_in(self, now: float) -> float:
        return (self.capacity - self.refill(now)) / self.rate


class LimitError(ApiError):
    """A 403/429 about a key's limits, with the rate-limit headers of the route's dialect
    (and ``x-should-retry: false`` for a budget: retrying before the reset cannot work)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        reason: str,
        extra: dict[str, str],
        retry_after: float | None = None,
        retry: bool = True,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status, code, message, retry_after=retry_after, details=details)
        self.reason = reason  # the cortex_key_limited_total label
        self.extra = extra
        self.retry = retry

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if not self.retry:
            headers[SHOULD_RETRY] = "false"
        headers.update(self.extra)
        return headers


class KeyState:
    """One account's allowance (the keys sharing a name share it)."""

    __slots__ = (
        "allowed",
        "base",
        "budget",
        "key",
        "name",
        "pending",
        "period_end",
        "period_start",
        "requests",
        "requests_taken",
        "resets_at",
        "tokens",
        "tokens_taken",
    )

    def __init__(self, key: ApiKey, now: float, wall: float) -> None:
        limits = key.limits
        self.key = key
        self.name = key.name
        self.requests = TokenBucket(limits.rpm, now) if limits.rpm else None
        self.tokens = TokenBucket(limits.tpm, now) if limits.tpm else None
        self.budget = limits.budget_tokens
        self.base = 0  # the period's tokens in the store (every gateway), at the last sync
        self.pending = 0  # charged here since, not in the store yet
        self.period_start, self.period_end = (
            period_bounds(limits.per, wall) if limits.per else (0.0, math.inf)
        )
        self.resets_at = rfc3339(self.period_end) if limits.per else ""  # made once a period
        # Running totals this gateway took (written to the store for the other gateways).
        self.requests_taken = 0
        self.tokens_taken = 0
        self.allowed: tuple[str, frozenset[str]] | None = None  # (default source, canonical ids)

    @property
    def spent(self) -> int:
        return self.base + self.pending

    def budget_left(self) -> int | None:
        return None if self.budget is None else self.budget - self.spent

    def roll(self, wall: float) -> None:
        """A new day or month: the budget starts again (the next sync reads the new base)."""
        per = self.key.limits.per
        if per is not None and wall >= self.period_end:
            self.period_start, self.period_end = period_bounds(per, wall)
            self.resets_at = rfc3339(self.period_end)
            self.base = 0

    def charge(self, tokens: int, now: float) -> None:
        """``tokens`` more (or fewer: a correction) used by a request of this key."""
        if tokens:
            self.pending += tokens
            self.tokens_taken += tokens
            if self.tokens is not None:
                self.tokens.take(tokens, now)

    def to_json(self, now: float, wall: float) -> dict[str, Any]:
        """For ``/admin/status`` and ``cortex status``."""
        self.roll(wall)
        view: dict[str, Any] = {"name": self.name, **self.key.limits.to_json()}
        view["requests_remaining"] = (
            max(0, math.floor(self.requests.refill(now))) if self.requests else None
        )
        view["tokens_remaining"] = (
            max(0, math.floor(self.tokens.refill(now))) if self.tokens else None
        )
        view["budget_used"] = self.spent if self.budget is not None else None
        view["budget_resets_at"] = self.resets_at if self.budget is not None else None
        return view


class Limits:
    """Every account's :class:`KeyState`; :meth:`admit` is the check a request passes."""

    def __init__(
        self,
        accounts: dict[str, ApiKey],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall = wall
        now, today = clock(), wall()
        self.states = {name: KeyState(key, now, today) for name, key in accounts.items()}

    def state(self, key: ApiKey) -> KeyState:
        found = self.states.get(key.name)
        if found is None:  # a key the set did not list up front (tests build sets by hand)
            found = self.states[key.name] = KeyState(key, self.clock(), self.wall())
        return found

    # ---- the check ------------------------------------------------------------------------

    def check_model(
        self,
        state: KeyState,
        requested: str,
        canonical: str,
        default_source: str,
        resolve: Callable[[str], str],
    ) -> None:
        """403 ``model_not_allowed`` unless the key may use ``requested`` (by the name the key
        file gives: a model id or an alias, compared as what they resolve to)."""
        models = state.key.limits.models
        if not models or requested in models:
            return
        cached = state.allowed
        if cached is None or cached[0] != default_source:
            ids = set()
            for name in models:
                try:
                    ids.add(resolve(name))
                except ApiError:
                    continue  # a name nothing resolves (yet): it cannot match anything
            cached = state.allowed = (default_source, frozenset(ids))
        if canonical in cached[1]:
            return
        raise LimitError(
            403,
            "model_not_allowed",
            f"the key {state.name!r} may not use model {requested[:200]!r} "
            f"(it may use: {', '.join(models)})",
            reason="model_not_allowed",
            extra={},
            retry=False,
        )

    def admit(self, state: KeyState, anthropic: bool) -> dict[str, str]:
        """Take one request from the key's allowance, or raise the 429 that says why not.
        Returns the rate-limit headers of the answer."""
        now, wall = self.clock(), self.wall()
        state.roll(wall)
        requests, tokens = state.requests, state.tokens
        left = state.budget_left()
        if left is not None and left <= 0:
            assert state.budget is not None
            raise LimitError(
                429,
                "budget_exceeded",
                f"the key {state.name!r} has used its budget of {state.budget} tokens per "
                f"{state.key.limits.per} ({state.spent} used); it resets at "
                f"{rfc3339(state.period_end)}",
                reason="budget",
                extra=self.headers(state, anthropic, now),
                # No Retry-After: the reset is hours away (the body, details.resets_at and
                # x-cortex-budget-reset say when). Codex CLI ignores x-should-retry and slept
                # the whole Retry-After, so a session hung until midnight instead of failing.
                retry_after=None,
                retry=False,
                details={
                    "budget_tokens": state.budget,
                    "used_tokens": state.spent,
                    "resets_at": rfc3339(state.period_end),
                },
            )
        if requests is not None and requests.refill(now) < 1:
            wait = requests.wait_for(1, now)
            raise LimitError(
                429,
                "rate_limit_exceeded",
                f"the key {state.name!r} is over its limit of {state.key.limits.rpm} requests "
                f"per minute; retry in {math.ceil(wait)}s",
                reason="requests_per_minute",
                extra=self.headers(state, anthropic, now),
                retry_after=wait,
            )
        if tokens is not None and tokens.refill(now) <= 0:
            wait = tokens.wait_for(1, now)
            raise LimitError(
                429,
                "rate_limit_exceeded",
                f"the key {state.name!r} is over its limit of {state.key.limits.tpm} tokens per "
                f"minute; retry in {math.ceil(wait)}s",
                reason="tokens_per_minute",
                extra=self.headers(state, anthropic, now),
                retry_after=wait,
            )
        if requests is not None:
            requests.take(1, now)
        state.requests_taken += 1
        return self.headers(state, anthropic, now)

    def headers(self, state: KeyState, anthropic: bool, now: float) -> dict[str, str]:
        """The key's allowance as OpenAI (``x-ratelimit-*``) or Anthropic
        (``anthropic-ratelimit-*``) state it, and its budget (``x-cortex-budget-*``)."""
        out: dict[str, str] = {}
        limits: KeyLimits = state.key.limits
        for kind, bucket, limit in (
            ("requests", state.requests, limits.rpm),
            ("tokens", state.tokens, limits.tpm),
        ):
            if bucket is None:
                continue
            remaining = str(max(0, math.floor(bucket.refill(now))))
            full_in = bucket.full_in(now)
            if anthropic:
                out[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                out[f"anthropic-ratelimit-{kind}-remaining"] = remaining
                out[f"anthropic-ratelimit-{kind}-reset"] = rfc3339(self.wall() + full_in)
            else:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = remaining
                out[f"x-ratelimit-reset-{kind}"] = go_duration(full_in)
        if state.budget is not None:
            out["x-cortex-budget-limit"] = str(state.budget)
            out["x-cortex-budget-remaining"] = str(max(0, state.budget - state.spent))
            out["x-cortex-budget-reset"] = state.resets_at
        return out

    # ---- what the store says ----------------------------------------------------------------

    def periods(self) -> dict[str, float]:
        """The start of the current ``day`` and ``month`` (what a sync reads totals since)."""
        wall = self.wall()
        return {per: period_bounds(per, wall)[0] for per in ("day", "month")}

    def counters(self) -> dict[str, tuple[int, int]]:
        """This gateway's running totals per account: (requests, tokens) taken."""
        return {
            name: (s.requests_taken, s.tokens_taken)
            for name, s in self.states.items()
            if s.requests_taken or s.tokens_taken
        }

    def synced(
        self,
        written: dict[str, int],
        totals: dict[tuple[str, str], int],
        periods: dict[str, float],
        peers_taken: dict[str, tuple[int, int]],
    ) -> None:
        """After a sync: ``written`` tokens per account are in the store now (no longer
        pending), ``totals`` are the store's tokens per (account, period kind) since
        ``periods``, and ``peers_taken`` what the other gateways took (requests, tokens) since
        the last sync, drained from this gateway's buckets."""
        now, wall = self.clock(), self.wall()
        for name, state in self.states.items():
            state.pending -= written.get(name, 0)
            state.roll(wall)
            per = state.key.limits.per
            if per is not None and periods.get(per) == state.period_start:
                state.base = totals.get((name, per), 0)
            took = peers_taken.get(name)
            if took is not None:
                if state.requests is not None and took[0] > 0:
                    state.requests.take(took[0], now)
                if state.tokens is not None and took[1] > 0:
                    state.tokens.take(took[1], now)
