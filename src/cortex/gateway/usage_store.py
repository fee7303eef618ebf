"""Where usage and the limit counters live: SQLite (the default, a file, nothing to run) or
PostgreSQL (one database for several gateways).

Both hold two tables, written in one transaction per sync by :mod:`cortex.gateway.accounting`:

- ``cortex_usage``: per UTC hour, key name and model, the requests, errors, prompt and
  completion tokens and seconds spent. Rows are added to (``ON CONFLICT ... DO UPDATE``), never
  rewritten, so any number of gateways can write the same hour.
- ``cortex_limit_counters``: per gateway (an id made at start) and key, the running totals of
  requests and tokens that gateway took. Each gateway reads the others' rows to drain its own
  token buckets (:mod:`cortex.gateway.limits`).

Why synchronous drivers in a thread: the store is written once per ``flush_interval``, never on
a request's path, so a driver's speed does not matter and ``sqlite3`` (standard library) and
``psycopg`` (``pip install 'cortex[postgres]'``) share one code path. Every call is bounded
(SQLite's busy timeout, PostgreSQL's connect and statement timeouts): a database that hangs
delays the next sync, never a request.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

log = logging.getLogger(__name__)

HOUR = 3600
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cortex_usage (
        hour BIGINT NOT NULL,
        key TEXT NOT NULL,
        model TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        duration_s DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, key, model))""",
    """CREATE TABLE IF NOT EXISTS cortex_limit_counters (
        gateway TEXT NOT NULL,
        key TEXT NOT NULL,
        requests BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        updated BIGINT NOT NULL,
        PRIMARY KEY (gateway, key))""",
)
ADD_USAGE = """INSERT INTO cortex_usage
    (hour, key, model, requests, errors, prompt_tokens, completion_tokens, duration_s)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (hour, key, model) DO UPDATE SET
        requests = cortex_usage.requests + excluded.requests,
        errors = cortex_usage.errors + excluded.errors,
        prompt_tokens = cortex_usage.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = cortex_usage.completion_tokens + excluded.completion_tokens,
        duration_s = cortex_usage.duration_s + excluded.duration_s"""
SET_COUNTERS = """INSERT INTO cortex_limit_counters (gateway, key, requests, tokens, updated)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (gateway, key) DO UPDATE SET
        requests = excluded.requests, tokens = excluded.tokens, updated = excluded.updated"""
PERIOD_TOKENS = """SELECT key, SUM(prompt_tokens + completion_tokens) FROM cortex_usage
    WHERE hour >= ? GROUP BY key"""
PEER_COUNTERS = """SELECT gateway, key, requests, tokens FROM cortex_limit_counters
    WHERE gateway <> ?"""
# Rows of gateways that stopped long ago (each start makes a new id).
FORGET_COUNTERS = "DELETE FROM cortex_limit_counters WHERE updated < ?"
COUNTERS_KEPT_S = 2 * 86400


@attrs.frozen
class UsageRow:
    """One hour of one key on one model (a delta to add, or a row read back)."""

    hour: int
    key: str
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0


@attrs.frozen
class SyncAnswer:
    """What a sync read back: tokens per (key, period kind) since each period's start, and the
    other gateways' running totals per (gateway, key): (requests, tokens)."""

    period_tokens: dict[tuple[str, str], int]
    peers: dict[tuple[str, str], tuple[int, int]]


class UsageStore(Protocol):
    """A usage database (SQLite or PostgreSQL). Called from one worker thread at a time."""

    name: str

    def sync(
        self,
        rows: Sequence[UsageRow],
        counters: dict[str, tuple[int, int]],
        gateway: str,
        periods: dict[str, float],
    ) -> SyncAnswer:
        """Add ``rows``, set this gateway's ``counters``, and read what :class:`SyncAnswer`
        holds, in one transaction."""
        ...

    def query(self, since: float, until: float, key: str | None, by_day: bool) -> list[UsageRow]:
        """Rows with ``since <= hour < until`` (one key, or every key), per hour or per day."""
        ...

    def close(self) -> None: ...


class _SqlStore:
    """The SQL both databases share; subclasses open a connection and name the placeholder."""

    name = "sql"
    placeholder = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Any = None

    # subclasses
    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        if self.placeholder == "?":
            return statement
        return statement.replace("%", "%%").replace("?", self.placeholder)  # psycopg's format

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self._connect()
            try:
                cur = conn.cursor()
                for statement in SCHEMA:
                    cur.execute(statement)
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._conn = conn
        return self._conn

    def _broken(self) -> None:
        """After a failure: drop the connection (the next call opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()

    def sync(
        self,
        rows: Sequence[UsageRow],
        counters: dict[str, tuple[int, int]],
        gateway: str,
        periods: dict[str, float],
    ) -> SyncAnswer:
        with self._lock:
            try:
                conn = self._connection()
                cur = conn.cursor()
                self._begin(cur)
                if rows:
                    cur.executemany(
                        self._sql(ADD_USAGE),
                        [
                            (
                                r.hour,
                                r.key,
                                r.model,
                                r.requests,
                                r.errors,
                                r.prompt_tokens,
                                r.completion_tokens,
                                r.duration_s,
                            )
                            for r in rows
                        ],
                    )
                now = int(time.time())
                if counters:
                    cur.executemany(
                        self._sql(SET_COUNTERS),
                        [(gateway, k, req, tok, now) for k, (req, tok) in counters.items()],
                    )
                cur.execute(self._sql(FORGET_COUNTERS), (now - COUNTERS_KEPT_S,))
                period_tokens: dict[tuple[str, str], int] = {}
                for per, start in periods.items():
                    cur.execute(self._sql(PERIOD_TOKENS), (int(start),))
                    for key, tokens in cur.fetchall():
                        period_tokens[(str(key), per)] = int(tokens or 0)
                cur.execute(self._sql(PEER_COUNTERS), (gateway,))
                peers = {
                    (str(g), str(k)): (int(req), int(tok)) for g, k, req, tok in cur.fetchall()
                }
                conn.commit()
            except BaseException:
                self._broken()
                raise
            return SyncAnswer(period_tokens, peers)

    def _begin(self, cur: Any) -> None:
        """Start the sync's transaction (PostgreSQL's driver starts one by itself)."""

    def query(self, since: float, until: float, key: str | None, by_day: bool) -> list[UsageRow]:
        bucket = "hour - (hour % 86400)" if by_day else "hour"
        where = "hour >= ? AND hour < ?" + (" AND key = ?" if key is not None else "")
        statement = (
            f"SELECT {bucket} AS bucket, key, model, SUM(requests), SUM(errors), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(duration_s) FROM cortex_usage "
            f"WHERE {where} GROUP BY bucket, key, model ORDER BY bucket, key, model"
        )
        params: list[Any] = [int(since), int(min(until, 2**62))]
        if key is not None:
            params.append(key)
        with self._lock:
            try:
                conn = self._connection()
                cur = conn.cursor()
                cur.execute(self._sql(statement), params)
                found = cur.fetchall()
                conn.commit()
            except BaseException:
                self._broken()
                raise
        return [
            UsageRow(int(b), str(k), str(m), int(r), int(e), int(p), int(c), float(d))
            for b, k, m, r, e, p, c, d in found
        ]

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


class SqliteStore(_SqlStore):
    """A SQLite file (WAL: gateways on one host may share it; readers never block writers)."""

    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def _connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode, transactions begun by hand: sqlite3's implicit ones would begin
        # lazily and could not be made IMMEDIATE.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, check_same_thread=False, isolation_level=None
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _begin(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")  # take the write lock now, not half way through


class PostgresStore(_SqlStore):
    """A PostgreSQL database (psycopg 3), shared by every gateway that names it."""

    name = "postgres"
    placeholder = "%s"

    def __init__(self, dsn: str, connect_timeout_s: int = 5, statement_timeout_s: int = 10) -> None:
        super().__init__()
        self._dsn = dsn  # may hold a password: never logged, never shown
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s

    def __repr__(self) -> str:
        return "PostgresStore()"

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - the extra is part of make venv
            raise RuntimeError(
                "[usage] store = 'postgres' needs psycopg: pip install 'cortex[postgres]'"
            ) from exc
        return psycopg.connect(
            self._dsn,
            connect_timeout=self.connect_timeout_s,
            options=f"-c statement_timeout={self.statement_timeout_s * 1000}",
        )


def merge_rows(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Rows with the same (hour, key, model) added together."""
    merged: dict[tuple[int, str, str], list[Any]] = {}
    for r in rows:
        acc = merged.setdefault((r.hour, r.key, r.model), [0, 0, 0, 0, 0.0])
        acc[0] += r.requests
        acc[1] += r.errors
        acc[2] += r.prompt_tokens
        acc[3] += r.completion_tokens
        acc[4] += r.duration_s
    return [UsageRow(h, k, m, *values) for (h, k, m), values in merged.items()]
