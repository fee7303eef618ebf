"""Units of keys and limits, on plain data and real stores: key-file lines, who a presented key
is, token buckets, budget periods, the check and its headers, fair queueing between keys, the
SQLite store and usage that survives a store outage (the end-to-end tests through the SDKs are
in tests/reliability/test_teams.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cortex.auth import GatewayAuth, KeySet, hash_key
from cortex.config import ConfigError
from cortex.gateway.accounting import Accounting, grouped, parse_time
from cortex.gateway.admission import Gate
from cortex.gateway.limits import LimitError, Limits, TokenBucket, go_duration, period_bounds
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.usage_store import SqliteStore, UsageRow
from cortex.keyfile import ApiKey, KeyLimits, format_line, parse_line, read_key_file
from cortex.wire.errors import ApiError

# ---- key files ------------------------------------------------------------------------------


def test_a_key_line_holds_a_name_and_limits(tmp_path: Path) -> None:
    line = f"{hash_key('k1')} alice models=qwen,acme/echo rpm=60 tpm=2000 budget_tokens=9 per=day"
    digest, name, limits = parse_line(line) or (b"", None, KeyLimits())
    assert name == "alice" and len(digest) == 32
    assert limits == KeyLimits(("qwen", "acme/echo"), 60, 2000, 9, "day")
    assert format_line(hash_key("k1"), name, limits) == line
    path = tmp_path / "keys.txt"
    path.write_text(
        f"# team\n{line}\n{hash_key('k2')}\n{hash_key('k3')} alice's laptop  # an old label\n\n"
    )
    entries = read_key_file(path)
    names = [e.key.name for e in entries]
    assert names == ["alice", "key-" + hash_key("k2")[7:15], "key-" + hash_key("k3")[7:15]]


@pytest.mark.parametrize(
    ("rest", "complaint"),
    [
        ("rpm=x", "whole number"),
        ("rpm=0", "at least 1"),
        ("budget_tokens=5", "go together"),
        ("per=week budget_tokens=5", "day or month"),
        ("colour=blue", "unknown attribute 'colour'"),
        ("rpm=1 rpm=2", "given twice"),
        ("models=", "comma-separated"),
    ],
)
def test_a_bad_key_line_names_its_line_not_its_content(
    tmp_path: Path, rest: str, complaint: str
) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{hash_key('ok')} fine\n{hash_key('k')} bob {rest}\n")
    with pytest.raises(ConfigError) as info:
        read_key_file(path)
    assert "line 2" in str(info.value) and complaint in str(info.value)


def test_lines_sharing_a_name_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{hash_key('old')} alice rpm=5\n{hash_key('new')} alice rpm=5\n")
    auth = GatewayAuth(KeySet.from_entries(read_key_file(path)), KeySet(), True)
    assert auth.key_names() == ["alice"]
    path.write_text(f"{hash_key('old')} alice rpm=5\n{hash_key('new')} alice rpm=6\n")
    with pytest.raises(ConfigError, match="alice"):
        GatewayAuth(KeySet.from_entries(read_key_file(path)), KeySet(), True)


def test_authenticate_says_who_and_admin_keys_win() -> None:
    alice = ApiKey("alice", KeyLimits(rpm=3))
    auth = GatewayAuth(
        KeySet.from_named({"a-key": alice}),
        KeySet.from_named({"root-key": ApiKey("ops")}),
        True,
    )
    assert auth.authenticate("/v1/chat/completions", {"x-api-key": "a-key"}) == alice
    ops = auth.authenticate("/admin/status", {"authorization": "Bearer root-key"})
    assert isinstance(ops, ApiKey) and ops.admin and ops.name == "ops"
    refused = auth.authenticate("/admin/status", {"x-api-key": "a-key"})
    assert isinstance(refused, ApiError) and refused.code == "admin_key_required"
    wrong = auth.authenticate("/v1/messages", {"x-api-key": "a-kez"})
    assert isinstance(wrong, ApiError) and wrong.status == 401
    assert auth.authenticate("/health", {}) is None
    assert "a-key" not in repr(auth.client_keys)


# ---- buckets, periods, the check ----------------------------------------------------------


def test_token_bucket_refills_and_owes() -> None:
    bucket = TokenBucket(60, now=0.0)
    bucket.take(60, 0.0)
    assert bucket.refill(0.5) == pytest.approx(0.5)
    bucket.take(10, 0.5)  # a debt
    assert bucket.wait_for(1, 0.5) == pytest.approx(10.5)
    assert bucket.full_in(100.0) == 0 and bucket.refill(1000.0) == 60


def test_periods_are_utc_days_and_months() -> None:
    assert period_bounds("day", 86400 * 3 + 5) == (86400 * 3, 86400 * 4)
    start, end = period_bounds("month", 1767225600 + 40 * 86400)  # 2026-02-10
    assert (start, end) == (1769904000, 1772323200)  # 2026-02-01, 2026-03-01
    assert period_bounds("month", 1796947200) == (1796083200, 1798761600)  # December -> January
    assert go_duration(0.25) == "250ms" and go_duration(2.5) == "2.5s"
    assert go_duration(90) == "1m30s"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_after_is_rounded_up() -> None:
    """A bucket with room in 2.4 s says 3, not 2: the SDKs retry exactly when told."""
    clock = Clock()
    limits = Limits({"a": ApiKey("a", KeyLimits(rpm=25))}, clock, clock)
    state = limits.states["a"]
    for _ in range(25):
        limits.admit(state, anthropic=False)
    with pytest.raises(LimitError) as info:
        limits.admit(state, anthropic=False)
    assert info.value.retry_after == pytest.approx(2.4)
    assert info.value.headers()["Retry-After"] == "3"


def test_admit_counts_requests_and_says_so_in_headers() -> None:
    clock = Clock()
    limits = Limits({"a": ApiKey("a", KeyLimits(rpm=2, tpm=100))}, clock, clock)
    state = limits.states["a"]
    first = limits.admit(state, anthropic=False)
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert first["x-ratelimit-limit-tokens"] == "100"
    second = limits.admit(state, anthropic=True)
    assert second["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(LimitError) as info:
        limits.admit(state, anthropic=False)
    assert info.value.status == 429 and info.value.reason == "requests_per_minute"
    assert info.value.retry_after == pytest.approx(30.0)
    assert info.value.headers()["Retry-After"] == "30"
    clock.now += 30
    limits.admit(state, anthropic=False)
    state.charge(150, clock.now)  # tokens known only after: a debt of 50
    clock.now += 30  # a request back, the debt paid off to zero: still no token
    with pytest.raises(LimitError) as tokens:
        limits.admit(state, anthropic=True)
    assert tokens.value.reason == "tokens_per_minute"
    assert tokens.value.retry_after == pytest.approx(0.6)  # one token at 100/min
    assert tokens.value.headers()["anthropic-ratelimit-tokens-remaining"] == "0"
    clock.now += 1.2
    assert limits.admit(state, anthropic=False)["x-ratelimit-remaining-tokens"] == "2"


def test_budget_refuses_until_the_period_resets_and_sync_moves_it() -> None:
    clock = Clock()
    clock.now = 86400 * 10 + 3600.0
    limits = Limits({"b": ApiKey("b", KeyLimits(budget_tokens=100, per="day"))}, clock, clock)
    state = limits.states["b"]
    headers = limits.admit(state, anthropic=False)
    assert headers["x-cortex-budget-remaining"] == "100"
    state.charge(100, clock.now)
    with pytest.raises(LimitError) as info:
        limits.admit(state, anthropic=False)
    error = info.value
    assert error.code == "budget_exceeded" and error.headers()["x-should-retry"] == "false"
    assert error.retry_after is None and "Retry-After" not in error.headers()  # hours away
    assert error.details == {
        "budget_tokens": 100,
        "used_tokens": 100,
        "resets_at": "1970-01-12T00:00:00Z",
    }
    # the store now holds those 100 (written), and another gateway's 50
    limits.synced({"b": 100}, {("b", "day"): 150}, limits.periods(), {})
    assert state.spent == 150
    clock.now += 86400  # the next day
    limits.admit(state, anthropic=False)
    assert state.spent == 0


def test_peers_drain_the_buckets() -> None:
    clock = Clock()
    limits = Limits({"c": ApiKey("c", KeyLimits(rpm=4))}, clock, clock)
    state = limits.states["c"]
    limits.synced({}, {}, limits.periods(), {"c": (3, 0)})
    limits.admit(state, anthropic=False)
    with pytest.raises(LimitError):
        limits.admit(state, anthropic=False)


def test_model_restriction_compares_what_names_resolve_to() -> None:
    limits = Limits({"d": ApiKey("d", KeyLimits(models=("qwen",)))})
    state = limits.states["d"]

    def resolve(name: str) -> str:
        if name == "qwen":
            return "hf:Qwen/Q"
        raise ApiError(404, "model_not_found", "no")

    limits.check_model(state, "qwen", "hf:Qwen/Q", "hf", resolve)
    limits.check_model(state, "Qwen/Q", "hf:Qwen/Q", "hf", resolve)
    with pytest.raises(LimitError) as info:
        limits.check_model(state, "other/x", "hf:other/x", "hf", resolve)
    assert info.value.status == 403 and info.value.code == "model_not_allowed"
    assert info.value.headers() == {"x-should-retry": "false"}


# ---- fair queueing --------------------------------------------------------------------------


async def settle() -> None:
    """Let every task that can run, run (a waiter's task needs a few turns to end)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_freed_slot_goes_to_the_key_holding_fewest() -> None:
    async def scenario() -> None:
        gate = Gate("m", limit=2, queue_size=3)
        held = [await gate.enter(None, 1.0, "greedy") for _ in range(2)]
        greedy = [asyncio.create_task(gate.enter(None, 1.0, "greedy")) for _ in range(3)]
        await settle()
        polite = asyncio.create_task(gate.enter(None, 1.0, "polite"))  # queue full: room made
        await settle()
        # the newest greedy waiter gave its place up, the older two still wait
        assert greedy[2].done() and isinstance(greedy[2].exception(), ApiError)
        assert not greedy[0].done() and not greedy[1].done() and not polite.done()
        held[0].release()  # greedy holds 1, polite 0: the slot goes to polite, not the oldest
        await settle()
        assert polite.done() and not greedy[0].done()
        assert gate.held == {"greedy": 1, "polite": 1}
        polite.result().release()  # both hold 1 now... greedy 1, polite 0: greedy's oldest
        await settle()
        assert greedy[0].done() and not greedy[1].done()
        held[1].release()
        await settle()
        assert greedy[1].done()
        greedy[0].result().release()
        greedy[1].result().release()
        assert gate.active == 0 and gate.held == {} and gate.waiting == 0

    asyncio.run(scenario())


def test_a_full_queue_makes_room_for_another_key() -> None:
    async def scenario() -> None:
        gate = Gate("m", limit=1, queue_size=2)
        slot = await gate.enter(None, 1.0, "greedy")
        queued = [asyncio.create_task(gate.enter(None, 1.0, "greedy")) for _ in range(2)]
        await settle()
        with pytest.raises(ApiError) as same:  # the same key: no room is made
            await gate.enter(None, 1.0, "greedy")
        assert same.value.code == "model_queue_full" and "fair share" not in same.value.message
        polite = asyncio.create_task(gate.enter(None, 1.0, "polite"))
        await settle()
        refused = queued[1].exception()  # the newest greedy waiter made room
        assert isinstance(refused, ApiError) and refused.code == "model_queue_full"
        assert "fair share" in refused.message and refused.status == 429
        # a second polite request: polite has 1 waiting, greedy 1: no more room is made
        with pytest.raises(ApiError):
            await gate.enter(None, 1.0, "polite")
        slot.release()  # both keys hold none: the oldest waiter (greedy's) goes first
        first = await queued[0]
        first.release()  # greedy holds none again, polite is the only one waiting
        got = await polite
        got.release()
        assert gate.active == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_requests_without_keys_stay_first_come_first_served() -> None:
    async def scenario() -> list[int]:
        gate = Gate("m", limit=1, queue_size=5)
        slot = await gate.enter(None, 1.0)
        order: list[int] = []

        async def wait(i: int) -> None:
            got = await gate.enter(None, 1.0)
            order.append(i)
            got.release()

        tasks = [asyncio.create_task(wait(i)) for i in range(4)]
        await asyncio.sleep(0)
        slot.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3]


# ---- the store and the accounting ---------------------------------------------------------


def test_sqlite_store_adds_rows_and_reads_periods(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "deep" / "usage.db")
    row = UsageRow(7200, "alice", "m", 1, 0, 10, 5, 0.5)
    answer = store.sync(
        [row, UsageRow(7200, "bob", "m", 1, 1)], {"alice": (1, 15)}, "g1", {"day": 0}
    )
    assert answer.period_tokens == {("alice", "day"): 15, ("bob", "day"): 0}
    answer = store.sync([row], {}, "g2", {"day": 3600})
    assert answer.peers == {("g1", "alice"): (1, 15)}
    hourly = store.query(0, 10**9, "alice", by_day=False)
    assert hourly == [UsageRow(7200, "alice", "m", 2, 0, 20, 10, 1.0)]
    assert grouped(store.query(0, 10**9, None, by_day=True), "total")[0]["requests"] == 2
    store.close()


def test_usage_waits_in_memory_while_the_store_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"

    async def scenario() -> None:
        limits = Limits({"a": ApiKey("a", KeyLimits(budget_tokens=1000, per="month"))})
        metrics = GatewayMetrics()
        accounting = Accounting(SqliteStore(path), limits, metrics, interval=60)
        assert await accounting.sync()
        limits.states["a"].charge(30, 0.0)
        accounting.record("a", "m", 20, 10, 0.1, False)
        # break the store: its table is replaced by something that refuses every write
        con = sqlite3.connect(path)
        con.execute("ALTER TABLE cortex_usage RENAME TO broken")
        con.execute("CREATE TABLE cortex_usage (hour BIGINT)")
        con.commit()
        con.close()
        assert not await accounting.sync()
        assert accounting.pending_rows == 1 and accounting.failures == 1
        assert limits.states["a"].spent == 30  # still enforced from memory
        limits.states["a"].charge(2, 0.0)
        accounting.record("a", "m", 1, 1, 0.1, True)
        con = sqlite3.connect(path)
        con.execute("DROP TABLE cortex_usage")
        con.execute("ALTER TABLE broken RENAME TO cortex_usage")
        con.commit()
        con.close()
        assert await accounting.sync()
        assert limits.states["a"].spent == 32 and limits.states["a"].pending == 0
        rows = await accounting.query(0, 10**10, "a", "total")
        assert [(r["requests"], r["errors"], r["total_tokens"]) for r in rows] == [(2, 1, 32)]
        await accounting.stop()

    asyncio.run(scenario())


def test_times_in_queries() -> None:
    assert parse_time("7d", 1_000_000.0, "since") == 1_000_000 - 7 * 86400
    assert parse_time("2026-01-05", 0, "since") == 1767571200
    assert parse_time("2026-01-05T01:00:00Z", 0, "since") == 1767574800
    assert parse_time("1767571200", 0, "since") == 1767571200
    with pytest.raises(ApiError) as info:
        parse_time("yesterday", 0, "since")
    assert info.value.code == "invalid_time" and info.value.param == "since"


# ---- cortex keys new --------------------------------------------------------------------------


def test_keys_new_writes_a_named_limited_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cortex.cli.cortex_cli import cli

    path = tmp_path / "keys.txt"
    args = ["keys", "new", "--name", "alice", "--models", "qwen,acme/echo", "--rpm", "60"]
    args += ["--tpm", "2000", "--budget-tokens", "100000", "--per", "day", "--key-file", str(path)]
    made = CliRunner().invoke(cli, args)
    assert made.exit_code == 0, made.output
    key = made.output.split("key:", 1)[1].split()[0]
    (entry,) = read_key_file(path)
    assert entry.digest.hex() == hash_key(key)[7:]
    assert entry.key == ApiKey("alice", KeyLimits(("qwen", "acme/echo"), 60, 2000, 100000, "day"))
    assert path.stat().st_mode & 0o777 == 0o600
    again = CliRunner().invoke(cli, ["keys", "new", "--name", "alice", "--key-file", str(path)])
    assert again.exit_code != 0 and "already has a key named 'alice'" in again.output
    alone = CliRunner().invoke(cli, ["keys", "new", "--name", "bob", "--budget-tokens", "5"])
    assert alone.exit_code != 0 and "--per" in alone.output
    assert len(read_key_file(path)) == 1
