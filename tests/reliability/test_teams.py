"""Teams on one fleet, end to end through the official SDKs: named keys limited to some models,
requests and tokens per minute, token budgets (streams ended cleanly at the budget), usage that
survives a restart, fair share between a greedy key and a polite one, and two gateways that
enforce one budget through one PostgreSQL (a real server, started here)."""

from __future__ import annotations

import datetime
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner

from cortex.auth import hash_key
from cortex.cli.cortex_cli import cli
from cortex.config import AuthSection, Duration, UsageSection
from cortex.testing.postgres import PostgresUnavailable, RunningPostgres, start_postgres

from .conftest import ECHO, SLOW, Parts, load

ADMIN = "ck-admin-teams-0123456789"
HELLO = [{"role": "user", "content": "hello there"}]


def write_keys(path: Path, keys: dict[str, str]) -> dict[str, str]:
    """A key file with one line per ``name: attributes``; returns name -> the secret key."""
    secrets = {name: f"ck-{name}-secret-{i:04d}-teams" for i, name in enumerate(keys)}
    lines = [f"{hash_key(secrets[name])} {name} {attrs}".rstrip() for name, attrs in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return secrets


def team_gateway(
    parts: Parts,
    tmp: Path,
    keys: dict[str, str],
    usage: UsageSection | None = None,
    neurons: dict[str, str] | None = None,
    **settings: Any,
) -> tuple[Any, dict[str, str]]:
    key_file = tmp / "keys.txt"
    if not key_file.exists():
        secrets = write_keys(key_file, keys)
    else:
        secrets = {name: f"ck-{name}-secret-{i:04d}-teams" for i, name in enumerate(keys)}
    (tmp / "admin.txt").write_text(hash_key(ADMIN) + " ops\n")
    ready = 1
    if neurons is None:
        ready = 2
        neuron = parts.neuron()
        load(neuron.url, ECHO)
        load(neuron.url, SLOW)
        neurons = {"n1": neuron.url}
    auth = AuthSection(keys_file=str(key_file), admin_keys_file=str(tmp / "admin.txt"))
    usage = usage or UsageSection(path=str(tmp / "usage.db"), flush_interval=Duration(0.2))
    gateway = parts.gateway(
        neurons, auth=auth, usage=usage, aliases={"echo": "acme/echo"}, **settings
    )
    gateway.wait_for(lambda: gateway.gateway.health()["models_ready"] >= ready)
    return gateway, secrets


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def claude(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def admin_get(url: str, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{url}{path}", params=params, headers={"x-api-key": ADMIN}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


# ---- limits -------------------------------------------------------------------------------


def test_requests_per_minute_with_the_headers_each_sdk_reads(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(parts, tmp_path, {"alice": "rpm=3", "carol": "rpm=2"})
    client = oai(gw.url, keys["alice"])
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="acme/echo", messages=HELLO)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert raw.parse().choices[0].message.content == "hello there"
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="acme/echo", messages=HELLO)
    refused = info.value
    assert refused.code == "rate_limit_exceeded" and "3 requests per minute" in refused.message
    assert int(refused.response.headers["retry-after"]) >= 1
    assert refused.response.headers["x-should-retry"] == "true"
    assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"

    # Anthropic's route answers in Anthropic's envelope with Anthropic's headers.
    messages = claude(gw.url, keys["carol"])
    for left in ("1", "0"):
        raw_m = messages.messages.with_raw_response.create(
            model="acme/echo", max_tokens=16, messages=HELLO
        )
        assert raw_m.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert raw_m.headers["anthropic-ratelimit-requests-remaining"] == left
        assert raw_m.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    with pytest.raises(anthropic.RateLimitError) as refused_m:
        messages.messages.create(model="acme/echo", max_tokens=16, messages=HELLO)
    body = refused_m.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error"
    assert refused_m.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    # the refusals are counted per key and reason; alice's other limits were untouched
    assert gw.metric("cortex_key_limited_total", key="alice", reason="requests_per_minute") == 1
    assert gw.metric("cortex_key_requests_total", key="alice", status="ok") == 3


def test_the_sdks_wait_as_retry_after_says_and_get_through(parts: Parts, tmp_path: Path) -> None:
    """One request back every 2.4 s: a client told to wait must find room when it retries once.
    Retry-After rounded to the nearest second said "2" and the SDK's one retry was refused again."""
    gw, keys = team_gateway(parts, tmp_path, {"alice": "rpm=25"})
    drain = oai(gw.url, keys["alice"])
    with pytest.raises(openai.RateLimitError):  # drain the bucket, whatever it holds
        for _ in range(26):
            drain.chat.completions.create(model="acme/echo", messages=HELLO)
    patient = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys["alice"], max_retries=1)
    started = time.monotonic()
    answer = patient.chat.completions.create(model="acme/echo", messages=HELLO)
    assert answer.choices[0].message.content == "hello there"
    assert time.monotonic() - started < 4  # it waited once, as told
    messages = anthropic.Anthropic(base_url=gw.url, api_key=keys["alice"], max_retries=1)
    reply = messages.messages.create(model="acme/echo", max_tokens=16, messages=HELLO)
    assert reply.content[0].type == "text" and reply.content[0].text == "hello there"


def test_a_key_limited_to_some_models_gets_403_for_others(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(parts, tmp_path, {"alice": "models=echo"})
    client = oai(gw.url, keys["alice"])
    # the alias the key file names, and the model it stands for, both work
    for name in ("echo", "acme/echo", ECHO):
        client.chat.completions.create(model=name, messages=HELLO)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="acme/slow", messages=HELLO)
    assert info.value.code == "model_not_allowed" and "echo" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        claude(gw.url, keys["alice"]).messages.create(
            model="acme/slow", max_tokens=8, messages=HELLO
        )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["type"] == "permission_error"
    assert gw.metric("cortex_key_limited_total", key="alice", reason="model_not_allowed") == 2


def test_tokens_per_minute(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(parts, tmp_path, {"alice": "tpm=40"})
    client = oai(gw.url, keys["alice"])
    words = " ".join(f"w{i}" for i in range(30))
    first = client.chat.completions.with_raw_response.create(
        model="acme/echo", messages=[{"role": "user", "content": words}]
    )
    assert first.headers["x-ratelimit-limit-tokens"] == "40"
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"  # charged as tokens are known
    usage = first.parse().usage
    assert usage is not None and usage.total_tokens > 40
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="acme/echo", messages=HELLO)
    assert "40 tokens per minute" in info.value.message
    # the debt is paid back at 40/60 tokens a second: Retry-After says when
    debt = usage.total_tokens - 40
    assert int(info.value.response.headers["retry-after"]) >= int(debt * 60 / 40) - 1
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_budget_ends_streams_cleanly_then_refuses(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(
        parts,
        tmp_path,
        {
            "alice": "budget_tokens=40 per=day",
            "bob": "budget_tokens=40 per=month",
            "carol": "budget_tokens=40 per=day",
        },
    )
    # OpenAI chat stream: ends with finish_reason "length" and usage at about the budget
    client = oai(gw.url, keys["alice"])
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="acme/slow", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish == "length"
    assert usage is not None and 40 <= usage.total_tokens <= 42
    assert text.split()[0] == "w0" and len(text.split()) == usage.completion_tokens
    assert time.monotonic() - started < 3  # cut, not the 5 s of the whole answer
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="acme/echo", messages=HELLO)
    refused = info.value
    assert refused.code == "budget_exceeded"
    assert refused.response.headers["x-should-retry"] == "false"  # waiting seconds cannot help
    reset = refused.response.headers["x-cortex-budget-reset"]
    assert reset.endswith("T00:00:00Z") and reset in refused.message
    assert "retry-after" not in refused.response.headers  # hours away: an agent must not sleep
    assert isinstance(refused.body, dict) and refused.body["details"]["resets_at"] == reset

    # Anthropic stream: stop_reason max_tokens, message_stop, usage
    with claude(gw.url, keys["bob"]).messages.stream(
        model="acme/slow", max_tokens=500, messages=HELLO
    ) as events:
        message = events.get_final_message()
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens > 0
    with pytest.raises(anthropic.RateLimitError):
        claude(gw.url, keys["bob"]).messages.create(model="acme/echo", max_tokens=8, messages=HELLO)

    # Responses stream: the response ends incomplete (max tokens), not with an error
    final = None
    for event in oai(gw.url, keys["carol"]).responses.create(
        model="acme/slow", input="hello there", stream=True
    ):
        if event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = event
    assert final is not None and final.type == "response.incomplete"
    assert gw.metric("cortex_key_limited_total", reason="budget_cut") == 3
    status = admin_get(gw.url, "/admin/status")
    alice = next(k for k in status["keys"] if k["name"] == "alice")
    assert alice["budget_used"] >= 40 and alice["budget_tokens"] == 40


def test_usage_is_exact_after_a_restart(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(parts, tmp_path, {"alice": "budget_tokens=100000 per=month", "bob": ""})
    expected: dict[tuple[str, str], list[int]] = {}

    def add(key: str, model: str, prompt: int, completion: int) -> None:
        row = expected.setdefault((key, model), [0, 0, 0])
        row[0] += 1
        row[1] += prompt
        row[2] += completion

    alice = oai(gw.url, keys["alice"])
    for i in range(3):
        done = alice.chat.completions.create(
            model="acme/echo", messages=[{"role": "user", "content": f"hi {i}"}]
        )
        assert done.usage is not None
        add("alice", ECHO, done.usage.prompt_tokens, done.usage.completion_tokens)
    for chunk in alice.chat.completions.create(
        model="acme/echo", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            add("alice", ECHO, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    message = claude(gw.url, keys["bob"]).messages.create(
        model="echo", max_tokens=64, messages=HELLO
    )
    add("bob", ECHO, message.usage.input_tokens, message.usage.output_tokens)
    completed = oai(gw.url, keys["bob"]).completions.create(
        model="acme/echo", prompt="a b c", max_tokens=8
    )
    assert completed.usage is not None
    add("bob", ECHO, completed.usage.prompt_tokens, completed.usage.completion_tokens)

    url = gw.url
    gw.stop()  # writes what is left before the process would end
    again = parts.gateway(
        {name: node.endpoint for name, node in gw.gateway.fleet.nodes.items()},
        auth=AuthSection(
            keys_file=str(tmp_path / "keys.txt"), admin_keys_file=str(tmp_path / "admin.txt")
        ),
        usage=UsageSection(path=str(tmp_path / "usage.db")),
        aliases={"echo": "acme/echo"},
    )
    assert again.url != url
    answer = admin_get(again.url, "/admin/usage", since="1h")
    until = datetime.datetime.fromisoformat(answer["until"].replace("Z", "+00:00"))
    assert until.timestamp() <= time.time() + 1  # "until" is now, not the hour's end
    got = {
        (r["key"], r["model"]): [r["requests"], r["prompt_tokens"], r["completion_tokens"]]
        for r in answer["usage"]
    }
    assert got == {k: v for k, v in expected.items()}
    # the budget picks up where it was
    spent = sum(v[1] + v[2] for (k, _), v in expected.items() if k == "alice")
    status = admin_get(again.url, "/admin/status")
    assert next(k for k in status["keys"] if k["name"] == "alice")["budget_used"] == spent
    # cortex usage shows the same, as JSON and CSV
    runner = CliRunner()
    env = {"CORTEX_ADMIN_KEY": ADMIN}
    shown = runner.invoke(
        cli, ["usage", "--endpoint", again.url, "--key", "alice", "--json"], env=env
    )
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.output)["usage"]
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        tuple(expected[("alice", ECHO)])
    ]
    table = runner.invoke(cli, ["usage", "--endpoint", again.url, "--csv"], env=env)
    assert table.exit_code == 0 and table.output.splitlines()[0].startswith("period,key,model")
    assert len(table.output.splitlines()) == 3
    daily = runner.invoke(cli, ["usage", "--endpoint", again.url, "--by", "day"], env=env)
    assert daily.exit_code == 0 and "alice" in daily.output and "bob" in daily.output


def test_names_in_log_metrics_and_status_never_keys(
    parts: Parts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw, keys = team_gateway(parts, tmp_path, {"alice": "rpm=100 models=echo", "bob": ""})
    with caplog.at_level(logging.INFO, logger="cortex.requests"):
        done = oai(gw.url, keys["alice"]).chat.completions.create(model="echo", messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            oai(gw.url, "ck-not-a-key").chat.completions.create(model="echo", messages=HELLO)
    lines = [r for r in caplog.records if r.name == "cortex.requests"]
    assert any(getattr(r, "fields", {}).get("key") == "alice" for r in lines)
    assert gw.metric("cortex_key_requests_total", key="alice", model=ECHO, status="ok") == 1
    assert done.usage is not None
    completion = done.usage.completion_tokens
    assert gw.metric("cortex_key_tokens_total", key="alice", kind="completion") == completion
    runner = CliRunner()
    shown = runner.invoke(cli, ["status", "--endpoint", gw.url], env={"CORTEX_ADMIN_KEY": ADMIN})
    assert shown.exit_code == 0, shown.output
    assert "alice" in shown.output
    # one request of rpm=100 spent; the bucket refills 100/min, so a slow machine may show it full
    assert re.search(r"\b(99|100) / 100\b", shown.output), shown.output
    everything = caplog.text + shown.output + json.dumps(admin_get(gw.url, "/admin/status"))
    for secret in keys.values():
        assert secret not in everything and hash_key(secret) not in everything


# ---- fair share ---------------------------------------------------------------------------


def test_a_greedy_key_does_not_starve_a_polite_one(parts: Parts, tmp_path: Path) -> None:
    gw, keys = team_gateway(
        parts,
        tmp_path,
        {"greedy": "", "polite": ""},
        max_in_flight_per_model=2,
        model_queue_size=6,
    )
    ends: list[tuple[float, str]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def ask(name: str) -> None:
        try:
            oai(gw.url, keys[name]).chat.completions.create(
                model="acme/slow", messages=HELLO, max_tokens=60
            )
        except openai.RateLimitError:
            with lock:
                refused.append(name)
            return
        with lock:
            ends.append((time.monotonic(), name))

    greedy = [threading.Thread(target=ask, args=("greedy",)) for _ in range(12)]
    for t in greedy:
        t.start()
    gw.wait_for(lambda: gw.gateway.scheduler.admission.gate(SLOW).waiting == 6)
    polite = threading.Thread(target=ask, args=("polite",))
    polite.start()
    for t in [*greedy, polite]:
        t.join(timeout=60)
    assert "polite" not in refused  # a full queue made room for it (fair share)
    order = [name for _, name in sorted(ends)]
    # the polite request took the first slot that freed: two answers (the greedy ones running
    # when it came) may end before it, not the greedy backlog queued ahead of it
    assert order.index("polite") <= 3, order
    assert refused.count("greedy") == 5  # 2 ran, 6 queued, 4 refused at once, 1 made room


def test_fair_share_holds_with_the_default_gate(parts: Parts, tmp_path: Path) -> None:
    """With the default ``max_in_flight_per_model`` (256) the gate holds what the replica runs
    at once (its ``max_batch``, 2 here), so a greedy key's backlog waits at the gate, where
    fair share reaches it, not in the neuron's first-come-first-served queue: the polite key's
    request runs as soon as one of the two running answers ends."""
    neuron = parts.neuron()
    answer = httpx.post(
        f"{neuron.url}/models/load", json={"model_id": SLOW, "max_batch": 2}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    gw, keys = team_gateway(
        parts, tmp_path, {"greedy": "", "polite": ""}, neurons={"n1": neuron.url}
    )
    gw.wait_for(lambda: gw.gateway.scheduler.running_at_once(SLOW) == 2)
    ends: list[tuple[float, str]] = []
    lock = threading.Lock()

    def ask(name: str) -> None:
        oai(gw.url, keys[name]).chat.completions.create(
            model="acme/slow", messages=HELLO, max_tokens=12
        )
        with lock:
            ends.append((time.monotonic(), name))

    greedy = [threading.Thread(target=ask, args=("greedy",)) for _ in range(8)]
    for t in greedy:
        t.start()
    gw.wait_for(lambda: gw.gateway.scheduler.admission.gate(SLOW).waiting == 6)
    polite = threading.Thread(target=ask, args=("polite",))
    polite.start()
    for t in [*greedy, polite]:
        t.join(timeout=60)
    order = [name for _, name in sorted(ends)]
    assert len(order) == 9
    assert order.index("polite") <= 3, order  # behind the two running, not the six waiting


# ---- several gateways, one PostgreSQL ------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[RunningPostgres]:
    try:
        running = start_postgres()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield running
    finally:
        running.remove()


def pg_usage(postgres: RunningPostgres, monkeypatch: pytest.MonkeyPatch) -> UsageSection:
    monkeypatch.setenv("CORTEX_TEST_USAGE_DSN", postgres.dsn)
    return UsageSection(
        store="postgres", dsn_env="CORTEX_TEST_USAGE_DSN", flush_interval=Duration(0.2)
    )


def test_two_gateways_on_one_postgres_enforce_one_budget(
    parts: Parts, tmp_path: Path, postgres: RunningPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = pg_usage(postgres, monkeypatch)
    neuron = parts.neuron()
    load(neuron.url, ECHO)
    keys = {"shared": "budget_tokens=60 per=day rpm=8"}
    a, secrets = team_gateway(parts, tmp_path, keys, usage=usage, neurons={"n1": neuron.url})
    b, _ = team_gateway(parts, tmp_path, keys, usage=usage, neurons={"n1": neuron.url})
    ten = " ".join(f"w{i}" for i in range(10))
    spent = answered = 0
    via_a = oai(a.url, secrets["shared"])
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            done = via_a.chat.completions.create(
                model="acme/echo", messages=[{"role": "user", "content": ten}]
            )
            assert done.usage is not None
            spent += done.usage.total_tokens
            answered += 1
    assert info.value.code == "budget_exceeded" and spent >= 60
    time.sleep(1.0)  # a sync or two of each gateway
    with pytest.raises(openai.RateLimitError) as other:
        oai(b.url, secrets["shared"]).chat.completions.create(model="acme/echo", messages=HELLO)
    assert other.value.code == "budget_exceeded"
    assert f"({spent} used)" in other.value.message
    # and both read the same usage (b's query writes its refused request first)
    seen_by_b = admin_get(b.url, "/admin/usage")["usage"]
    assert seen_by_b == admin_get(a.url, "/admin/usage")["usage"]
    assert [(r["requests"], r["errors"], r["total_tokens"]) for r in seen_by_b] == [
        (answered + 2, 2, spent)
    ]


def test_two_gateways_share_a_request_rate(
    parts: Parts, tmp_path: Path, postgres: RunningPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = pg_usage(postgres, monkeypatch)
    neuron = parts.neuron()
    load(neuron.url, ECHO)
    keys = {"rated": "rpm=4"}
    a, secrets = team_gateway(parts, tmp_path, keys, usage=usage, neurons={"n1": neuron.url})
    b, _ = team_gateway(parts, tmp_path, keys, usage=usage, neurons={"n1": neuron.url})
    for gateway in (a, a, a):
        oai(gateway.url, secrets["rated"]).chat.completions.create(
            model="acme/echo", messages=HELLO
        )
    time.sleep(1.0)  # b reads a's three requests and drains its own bucket by them
    oai(b.url, secrets["rated"]).chat.completions.create(model="acme/echo", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        oai(b.url, secrets["rated"]).chat.completions.create(model="acme/echo", messages=HELLO)


def test_a_database_outage_never_fails_a_request(
    parts: Parts, tmp_path: Path, postgres: RunningPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = pg_usage(postgres, monkeypatch)
    gw, keys = team_gateway(
        parts, tmp_path, {"outage": "budget_tokens=100000 per=day"}, usage=usage
    )
    client = oai(gw.url, keys["outage"])
    before = admin_get(gw.url, "/admin/usage", key="outage")["usage"]
    assert before == []
    postgres.stop()
    try:
        tokens = 0
        for _ in range(5):
            done = client.chat.completions.create(model="acme/echo", messages=HELLO)
            assert done.usage is not None
            tokens += done.usage.total_tokens
        gw.wait_for(lambda: gw.metric("cortex_usage_store_errors_total") >= 2)
        assert gw.metric("cortex_usage_store_up") == 0
        status = admin_get(gw.url, "/admin/status")
        assert status["usage_store"]["ok"] is False and status["usage_store"]["pending_rows"] == 1
        answer = httpx.get(f"{gw.url}/admin/usage", headers={"x-api-key": ADMIN}, timeout=30)
        assert (
            answer.status_code == 503
            and answer.json()["error"]["code"] == "usage_store_unavailable"
        )
        assert "retry-after" in answer.headers
    finally:
        postgres.start()
    gw.wait_for(lambda: gw.metric("cortex_usage_store_up") == 1, timeout=20)
    rows = admin_get(gw.url, "/admin/usage", key="outage")["usage"]
    assert [(r["requests"], r["total_tokens"]) for r in rows] == [(5, tokens)]
