"""The operator commands against a real ``cortex serve`` process with keys configured:
``cortex status``, ``cortex models``, ``cortex load``, ``cortex unload``, ``neuron status``,
and the gateway's JSON request log (one line per request, never a key)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from cortex.testing.cluster import Fleet
from cortex.testing.servers import ProcessServer, python_program

CLIENT_KEY = "ck-client-0123456789abcdefghij"
ADMIN_KEY = "ck-admin-0123456789abcdefghijkl"
HELLO = [{"role": "user", "content": "hello"}]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_program("cortex.cli", *args),
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "CORTEX_PLUGINS": "", **(env or {})},
    )


@pytest.fixture
def served(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[ProcessServer, str, str]]:
    """``cortex serve --log-format json`` with client and admin keys, a pinned and a plain
    profile; yields (server, the pinned model, the plain model)."""
    pinned = fleet.publish_echo("ops/pinned", reply="pinned reply", memory_mb=30)
    plain = fleet.publish_echo("ops/plain", reply="plain reply", memory_mb=20)
    (tmp_path / "models.toml").write_text(
        '[[models]]\nid = "ops/pinned"\nmemory_mb = 30\npinned = true\nnodes = ["n1"]\n\n'
        '[[models]]\nid = "ops/plain"\nmemory_mb = 20\n\n[aliases]\n"plain" = "ops/plain"\n'
    )
    neurons = "".join(
        f'[[neurons]]\nname = "{name}"\nendpoint = "{fleet.neuron_url(name)}"\n\n'
        for name in fleet.neurons
    )
    (tmp_path / "cortex.toml").write_text(
        'models_config = "models.toml"\n\n[gateway]\npoll_interval = "200ms"\n\n'
        '[auth]\nkeys_env = "OPS_KEYS"\nadmin_keys_env = "OPS_ADMIN_KEYS"\n\n' + neurons
    )
    argv = python_program(
        "cortex.cli",
        "cortex",
        "serve",
        "-c",
        str(tmp_path / "cortex.toml"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    )
    env = {"CORTEX_PLUGINS": "", "OPS_KEYS": CLIENT_KEY, "OPS_ADMIN_KEYS": ADMIN_KEY}
    with ProcessServer(argv, env=env) as server:
        yield server, pinned, plain


def test_admin_commands_status_and_json_logs(served, fleet: Fleet, tmp_path: Path) -> None:
    server, pinned, plain = served
    admin = {"CORTEX_ENDPOINT": server.url, "CORTEX_ADMIN_KEY": ADMIN_KEY}

    # Without the admin key: a one-line reason and a non-zero exit.
    refused = cli("cortex", "models", "--endpoint", server.url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "401" in refused.stderr
    assert "--admin-key" in refused.stderr
    # A client key is not an admin key.
    wrong = cli("cortex", "status", env={**admin, "CORTEX_ADMIN_KEY": CLIENT_KEY})
    assert wrong.returncode == 1 and "403" in wrong.stderr
    # Never from an argument (ps, shell history): refused before any request, key not echoed.
    argued = cli("cortex", "status", "--endpoint", server.url, "--admin-key", ADMIN_KEY)
    assert argued.returncode == 2 and "CORTEX_ADMIN_KEY" in argued.stderr
    assert ADMIN_KEY not in argued.stdout + argued.stderr
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    from_file = cli(
        "cortex",
        "status",
        "--admin-key-file",
        str(key_file),
        "--json",
        env={"CORTEX_ENDPOINT": server.url},
    )
    assert from_file.returncode == 0, from_file.stderr

    loaded = cli("cortex", "load", "ops/pinned", "--node", "n1", env=admin)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == f"loaded {pinned} on n1"
    again = cli("cortex", "load", "ops/pinned", env=admin)
    assert again.stdout.strip() == f"{pinned} is already ready on n1"
    placed = cli("cortex", "load", "plain", "--node", "n2", env=admin)
    assert placed.stdout.strip() == f"loaded {plain} on n2", placed.stderr
    unknown_node = cli("cortex", "load", "plain", "--node", "n9", env=admin)
    assert unknown_node.returncode == 1 and "node_not_found" in unknown_node.stderr

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    assert client.chat.completions.create(model="plain", messages=HELLO).choices
    streamed = client.chat.completions.create(model="ops/pinned", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "pinned reply"
    claude = anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0)
    assert claude.messages.create(model="plain", max_tokens=20, messages=HELLO).content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody/nothing", messages=HELLO)

    listed = cli("cortex", "models", "--json", env=admin)
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    assert entries[pinned]["state"] == "ready" and entries["plain"]["alias_for"] == plain
    table = cli("cortex", "models", env=admin).stdout
    # the echo model's context window and what it can do, from the loaded copy
    assert re.search(
        rf"{re.escape(pinned)}\s+ready\s+n1:ready\s+4096\s+chat, logprobs, tools", table
    )

    status = cli("cortex", "status", env=admin)
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "2/2 nodes up" in out
    assert re.search(r"n1\s+up\s+cpu", out) and re.search(r"n2\s+up\s+cpu", out)
    assert "[" in out and "/ 1000.0 MiB" in out  # memory bars: used / total
    assert re.search(
        rf"{re.escape(pinned)}\s+n1\s+cpu\s+ready\s+30\.0 MiB\s+0\s+\S+\s+yes"
        r"\s+chat, logprobs, tools",
        out,
    )
    assert re.search(rf"{re.escape(plain)}\s+n2\s+cpu\s+ready\s+20\.0 MiB\s+0\s+\S+\s+-", out)
    assert re.search(rf"load\s+{re.escape(plain)}\s+n2\s+ok", out)

    unloaded = cli("cortex", "unload", "plain", env=admin)
    assert unloaded.stdout.strip() == f"unloaded {plain} from n2", unloaded.stderr
    view = json.loads(cli("cortex", "status", "--json", env=admin).stdout)
    assert [m["id"] for m in view["models"]] == [pinned]
    assert view["events"][0]["kind"] == "evict" and view["events"][0]["outcome"] == "manual"
    assert {n["name"]: n["up"] for n in view["nodes"]} == {"n1": True, "n2": True}

    # The request log: one JSON object per request, with the fields operators filter on.
    server.terminate()
    lines = [json.loads(line) for line in server.text.splitlines() if line.startswith("{")]
    logged = [e for e in lines if e["logger"] == "cortex.requests"]
    # the two refused admin calls are logged too (401 without a key, 403 with a client key)
    refusals = [
        (e["message"], e.get("http_status")) for e in logged if e.get("http_status") in (401, 403)
    ]
    assert refusals == [("/admin/models", 401), ("/admin/status", 403)], refusals
    requests = [e for e in logged if e.get("http_status") not in (401, 403)]
    assert len(requests) == 4
    ok = [e for e in requests if e["status"] == "ok"]
    assert {(e["message"], e["model"], e["node"]) for e in ok} == {
        ("/v1/chat/completions", plain, "n2"),
        ("/v1/chat/completions", pinned, "n1"),
        ("/v1/messages", plain, "n2"),
    }
    for entry in ok:
        assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
        assert entry["duration_s"] >= 0
    assert [e["ttft_s"] is not None for e in ok if e["model"] == pinned] == [True]
    (failed,) = [e for e in requests if e["status"] == "error"]
    assert failed["code"] == "model_not_found" and failed["http_status"] == 404
    # No key, no token, ever.
    assert CLIENT_KEY not in server.text and ADMIN_KEY not in server.text


def test_status_exits_non_zero_with_one_line_when_unreachable() -> None:
    result = cli("cortex", "status", "--endpoint", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach the gateway at http://127.0.0.1:9")
    assert result.stderr.count("\n") == 1
    neuron = cli("neuron", "status", "--endpoint", "http://127.0.0.1:9")
    assert neuron.returncode == 1 and neuron.stderr.count("\n") == 1
    assert neuron.stderr.startswith("error: cannot reach the neuron")


def test_neuron_status(fleet: Fleet) -> None:
    model = fleet.publish_echo("ops/node", reply="x", memory_mb=40)
    fleet.load_on("n1", model)
    result = cli("neuron", "status", "--endpoint", fleet.neuron_url("n1"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"neuron n1 at \S+: ok", result.stdout)
    assert re.search(r"cpu\s+cpu\s+ok\s+\[#*\.*\] 40\.0 MiB / 1000\.0 MiB", result.stdout), (
        result.stdout
    )
    assert re.search(rf"{re.escape(model)}\s+echo\s+cpu\s+ready\s+40\.0 MiB\s+0", result.stdout)
    as_json = json.loads(
        cli("neuron", "status", "--json", "--endpoint", fleet.neuron_url("n1")).stdout
    )
    assert as_json["health"]["node"] == "n1"
    assert [m["id"] for m in as_json["models"]] == [model]


@pytest.mark.parametrize(
    "args",
    [
        ("cortex", "status"),
        ("cortex", "models"),
        ("cortex", "load"),
        ("cortex", "unload"),
        ("neuron", "status"),
        ("cortex", "serve"),
        ("neuron", "run"),
        ("cortex", "keys"),
        ("cortex", "registry"),
        ("cortex", "plugins"),
        ("neuron", "pull"),
        ("neuron", "plugins"),
    ],
)
def test_every_command_has_help_with_an_example(args: tuple[str, ...]) -> None:
    result = cli(*args, "--help")
    assert result.returncode == 0
    assert "Example:" in result.stdout or "Examples:" in result.stdout
    if args[1] in ("serve", "run"):
        assert "--log-format [text|json]" in result.stdout


def test_neuron_logs_one_json_line_per_generation(fleet: Fleet, tmp_path: Path) -> None:
    from cortex.testing.cluster import neuron_argv, neuron_toml

    model = fleet.publish_echo("ops/logged", reply="one two three", memory_mb=10)
    config = tmp_path / "n9.toml"
    config.write_text(neuron_toml("n9", fleet.registry.url, tmp_path / "cache", 500))
    argv = [*neuron_argv(config), "--log-format", "json"]
    env = {"CORTEX_TEST_NO_TOKEN": "", "CUDA_VISIBLE_DEVICES": ""}
    with ProcessServer(argv, env=env) as neuron:
        loaded = httpx.post(f"{neuron.url}/models/load", json={"model_id": model}, timeout=60)
        assert loaded.status_code == 200, loaded.text
        client = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=model, messages=HELLO)
        assert reply.choices[0].message.content == "one two three"
        neuron.terminate()
    lines = [json.loads(line) for line in neuron.text.splitlines() if line.startswith("{")]
    (generation,) = [e for e in lines if e["logger"] == "neuron.requests"]
    assert generation["model"] == model and generation["finish"] == "stop"
    assert generation["completion_tokens"] == reply.usage.completion_tokens
    assert generation["prompt_tokens"] == reply.usage.prompt_tokens
    assert generation["ttft_s"] <= generation["duration_s"]
    # every line the neuron wrote to its log is a JSON object (its banner goes to stdout first)
    logged = [line for line in neuron.text.splitlines() if line and not line.startswith("{")]
    assert all(line.startswith(("neuron n9:", "listening on")) for line in logged), logged
