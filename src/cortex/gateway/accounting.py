"""Usage accounting per key and model: recorded in memory on the request's path, written to the
store (:mod:`cortex.gateway.usage_store`) in batches off it.

Why batched: a request ends with one dict update here (no I/O, no await); once per
``[usage] flush_interval`` a background task adds everything since the last sync to the store in
one transaction, in a worker thread, and reads back what the limits need (the period's tokens
per key across every gateway, the other gateways' running totals). A store that is down or slow
delays that sync, never a request: the rows stay in memory (one per hour, key and model, so
memory stays small however long the outage), failed syncs are counted
(``cortex_usage_store_errors_total``) and logged, and the next sync that works writes them all.
Budgets keep being enforced meanwhile from what this gateway saw.

The request's :class:`cortex.gateway.tally.Tally` calls :meth:`Accounting.record` exactly once,
when the request ends (failures included), so usage and the metrics always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from cortex.config import Duration
from cortex.gateway.limits import Limits, rfc3339
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.usage_store import HOUR, UsageRow, UsageStore
from cortex.wire.errors import ApiError, bad_request

log = logging.getLogger(__name__)

GROUPS = ("hour", "day", "month", "total")


class Accounting:
    """See the module docstring."""

    def __init__(
        self,
        store: UsageStore | None,
        limits: Limits,
        metrics: GatewayMetrics,
        interval: float = 1.0,
    ) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.interval = interval
        self.gateway_id = uuid.uuid4().hex[:12]
        self._rows: dict[tuple[int, str, str], list[Any]] = {}
        self._tokens: dict[str, int] = {}  # tokens in _rows, per key
        self._peers: dict[tuple[str, str], tuple[int, int]] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # failed syncs in a row
        self.last_error: str | None = None
        self.last_sync: float | None = None

    # ---- the request path -------------------------------------------------------------------

    def record(
        self,
        key: str,
        model: str,
        prompt: int,
        completion: int,
        seconds: float,
        error: bool,
    ) -> None:
        """One request of ``key`` on ``model`` ended (no I/O here)."""
        hour = int(time.time()) // HOUR * HOUR
        slot = (hour, key, model)
        acc = self._rows.get(slot)
        if acc is None:
            acc = self._rows[slot] = [0, 0, 0, 0, 0.0]
        acc[0] += 1
        if error:
            acc[1] += 1
        acc[2] += prompt
        acc[3] += completion
        acc[4] += seconds
        if prompt or completion:
            self._tokens[key] = self._tokens.get(key, 0) + prompt + completion

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the period's usage back (budgets survive a restart), then sync periodically."""
        await self.sync()
        self._task = asyncio.create_task(self._run(), name="usage-sync")

    async def stop(self) -> None:
        """Write what is left, then close the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self.sync()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync()
            except Exception:  # never let the loop die
                log.exception("usage sync failed unexpectedly")

    # ---- syncing ----------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Write the rows recorded since the last sync and read back what the limits need.
        False when the store could not be reached (the rows are kept for the next try)."""
        store = self.store
        if store is None:
            self._budget_gauges()
            return True
        async with self._lock:
            taken, tokens = self._rows, self._tokens
            self._rows, self._tokens = {}, {}
            rows = [UsageRow(h, k, m, *acc) for (h, k, m), acc in taken.items()]
            counters = self.limits.counters()
            periods = self.limits.periods()
            try:
                answer = await asyncio.to_thread(
                    store.sync, rows, counters, self.gateway_id, periods
                )
            except Exception as exc:
                self._put_back(taken, tokens)
                self._failed(exc)
                return False
            self.limits.synced(
                tokens, answer.period_tokens, periods, self._peer_deltas(answer.peers)
            )
            if self.failures:
                log.info(
                    "usage store %s reachable again after %d failed sync(s): caught up",
                    store.name,
                    self.failures,
                )
            self.failures = 0
            self.last_error = None
            self.last_sync = time.time()
            self.metrics.usage_store_up.set(1)
            self.metrics.usage_pending_rows.set(len(self._rows))
            self._budget_gauges()
            return True

    def _budget_gauges(self) -> None:
        for name, state in self.limits.states.items():
            left = state.budget_left()
            if left is not None:
                self.metrics.key_budget_remaining.labels(name).set(max(0, left))

    def _put_back(
        self, taken: dict[tuple[int, str, str], list[Any]], tokens: dict[str, int]
    ) -> None:
        for slot, acc in taken.items():
            mine = self._rows.get(slot)
            if mine is None:
                self._rows[slot] = acc
            else:
                for i, value in enumerate(acc):
                    mine[i] += value
        for key, count in tokens.items():
            self._tokens[key] = self._tokens.get(key, 0) + count

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        # what went wrong, never the DSN (psycopg's messages name host and port, not passwords)
        self.last_error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        self.metrics.usage_store_errors.inc()
        self.metrics.usage_store_up.set(0)
        self.metrics.usage_pending_rows.set(len(self._rows))
        level = logging.WARNING if self.failures == 1 or self.failures % 60 == 0 else logging.DEBUG
        log.log(
            level,
            "usage store %s: sync failed (%d in a row; %d row(s) kept in memory, requests go "
            "on): %s",
            self.store.name if self.store else "-",
            self.failures,
            len(self._rows),
            self.last_error,
        )

    def _peer_deltas(
        self, peers: dict[tuple[str, str], tuple[int, int]]
    ) -> dict[str, tuple[int, int]]:
        """What the other gateways took per key since the last sync (nothing on the first)."""
        seen, self._peers = self._peers, dict(peers)
        if seen is None:
            return {}
        deltas: dict[str, tuple[int, int]] = {}
        for (gateway, key), (requests, tokens) in peers.items():
            before = seen.get((gateway, key), (0, 0))
            took = (max(0, requests - before[0]), max(0, tokens - before[1]))
            if took != (0, 0):
                mine = deltas.get(key, (0, 0))
                deltas[key] = (mine[0] + took[0], mine[1] + took[1])
        return deltas

    # ---- reading ----------------------------------------------------------------------------

    async def query(
        self, since: float, until: float, key: str | None, group: str
    ) -> list[dict[str, Any]]:
        """Usage rows between ``since`` and ``until`` (rounded down to the hour), for one key or
        all, grouped per ``hour``, ``day``, ``month`` (UTC) or in ``total``; what this gateway
        recorded so far is written first."""
        if self.store is None:
            raise ApiError(
                409, "usage_off", "usage accounting is off on this gateway ([usage] store)"
            )
        if not await self.sync():
            raise ApiError(
                503,
                "usage_store_unavailable",
                f"the usage store ({self.store.name}) cannot be reached: {self.last_error}",
                retry_after=max(1.0, self.interval),
            )
        since = int(since) // HOUR * HOUR
        try:
            rows = await asyncio.to_thread(
                self.store.query, since, until, key, group in ("day", "month", "total")
            )
        except Exception as exc:
            self._failed(exc)
            raise ApiError(
                503,
                "usage_store_unavailable",
                f"the usage store ({self.store.name}) cannot be read: {self.last_error}",
                retry_after=max(1.0, self.interval),
            ) from None
        return grouped(rows, group)

    def status(self) -> dict[str, Any]:
        """For ``/admin/status``: the store, its health and what waits to be written."""
        return {
            "store": self.store.name if self.store is not None else "off",
            "ok": self.failures == 0,
            "failed_syncs": self.failures,
            "last_error": self.last_error,
            "last_sync": self.last_sync,
            "pending_rows": len(self._rows),
            "gateway_id": self.gateway_id,
        }


def parse_time(text: str, now: float, param: str) -> float:
    """A point in time from a query: ``7d`` / ``24h`` / ``30m`` (that long ago), an ISO 8601
    date or time (``2026-01-05``, ``2026-01-05T10:00:00Z``; UTC unless it says otherwise), or
    unix seconds. A 400 ``invalid_time`` naming ``param`` otherwise."""
    value = text.strip()
    if not value:
        raise bad_request(f"{param!r} is empty", param=param, code="invalid_time")
    with contextlib.suppress(ValueError):
        return float(value)
    if value[-1] in "mhd" and value[0].isdigit():
        with contextlib.suppress(ValueError):
            ago = Duration.parse(value).seconds
            if ago is not None:
                return now - ago
    with contextlib.suppress(ValueError):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    raise bad_request(
        f"{param!r} is not a time: use 7d / 24h / 30m (ago), an ISO date or time "
        "(2026-01-05, 2026-01-05T10:00:00Z) or unix seconds",
        param=param,
        code="invalid_time",
    )


def _period(bucket: int, group: str) -> str | None:
    if group == "total":
        return None
    if group == "month":
        moment = datetime.fromtimestamp(bucket, UTC)
        return f"{moment.year:04d}-{moment.month:02d}-01T00:00:00Z"
    return rfc3339(bucket)


def grouped(rows: Iterable[UsageRow], group: str) -> list[dict[str, Any]]:
    """Store rows (per hour or per day) summed per ``group`` period, key and model."""
    out: dict[tuple[str | None, str, str], dict[str, Any]] = {}
    for row in rows:
        period = _period(row.hour, group)
        entry = out.get((period, row.key, row.model))
        if entry is None:
            entry = out[(period, row.key, row.model)] = {
                "period": period,
                "key": row.key,
                "model": row.model,
                "requests": 0,
                "errors": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "duration_s": 0.0,
            }
        entry["requests"] += row.requests
        entry["errors"] += row.errors
        entry["prompt_tokens"] += row.prompt_tokens
        entry["completion_tokens"] += row.completion_tokens
        entry["total_tokens"] += row.prompt_tokens + row.completion_tokens
        entry["duration_s"] = round(entry["duration_s"] + row.duration_s, 3)
    return sorted(out.values(), key=lambda e: (e["period"] or "", e["key"], e["model"]))
