"""A bounded soak on loopback: a mixed workload through a real gateway across two echo
neurons, with faults injected on a schedule.

Everything is real: an HF-compatible registry (a ``cortex registry serve`` process, so it can be
killed) serves the echo models, ``neuron run`` and ``cortex serve`` run as processes (so the
gateway's RSS is its own), and the client speaks HTTP with one aiohttp session. The workload
cycles through every dialect (OpenAI chat and completions, Anthropic messages, OpenAI
responses; whole and streamed), streams the client cuts after their first chunk, and bad inputs
(malformed JSON, a lone surrogate, an id no registry can express, an unknown model, a wrong
type). On the way, at fixed points of the run:

- 35 %: the registry goes down; from then on some requests ask for ``acme/soak-late``, a model
  in models.toml that no neuron has fetched yet, so its cold load meets a dead registry;
- 50 %: neuron ``b`` is killed (SIGKILL) and started again on the same port (it reloads its
  default model from its cache, the registry being down);
- 65 %: the registry is back (same port); ``soak-late`` loads once its backoff has passed.

Every request ends in exactly one bucket:

- ``completed``: a 200 with a whole answer (a stream that reached its end event);
- ``cut_by_client``: a stream the client closed after its first chunk, on purpose;
- ``rejected``: a bad input answered with a 4xx in its route's envelope, as it must be;
- ``failed_retryable``: an error the gateway said can be retried (429/502/503/504 with
  ``Retry-After``, or an error event at the end of a stream cut by the kill);
- ``failed_other``: any other error in an envelope, or a bad input that was not a 4xx (must be 0);
- ``lost``: no answer and no error (a reset connection, a malformed body, a stream that just
  stops, a timeout) -- must be 0: the point of the gateway is to always say what happened.

Every 5xx is also counted by its code (``server_errors``); all must be among
:data:`DOCUMENTED_5XX`, the upstream failures docs/reliability.md lists.

Run: ``python -m cortex.testing.soak --requests 20000 --concurrency 64`` (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from cortex.testing.registry import publish_repo
from cortex.testing.servers import ProcessServer, python_program

MODEL = "huggingface:acme/soak-echo"
LATE = "huggingface:acme/soak-late"
RETRYABLE = {429, 502, 503, 504}
# The 5xx answers docs/reliability.md documents for faults upstream of the gateway: a neuron
# that died or hangs, a registry that is down, capacity. Anthropic's envelope has no code: its
# error type stands in (``overloaded_error`` is a 503, ``api_error`` a 502/504).
DOCUMENTED_5XX = frozenset(
    {
        "upstream_connection_error",
        "upstream_timeout",
        "service_unavailable",
        "registry_unreachable",
        "queue_full",
        "queue_timeout",
        "nodes_at_capacity",
        "load_timeout",
        "model_unloaded",
        "overloaded_error",
        "api_error",
    }
)
# One cycle of the workload: a request kind per index (index % len).
CYCLE = (
    "chat", "chat_stream", "completions", "completions_stream", "messages", "messages_stream",
    "responses", "responses_stream", "chat", "chat_stream", "cut_chat", "messages", "chat",
    "cut_messages", "bad", "chat_stream", "responses", "chat", "late", "chat_stream",
)  # fmt: skip
BAD_INPUTS: tuple[tuple[str, bytes], ...] = (
    ("/v1/chat/completions", b'{"model": "x", "messages": ['),
    (
        "/v1/chat/completions",
        b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}',
    ),
    ("/v1/messages", b'{"model": "acme/x{}", "max_tokens": 5, "messages": []}'),
    ("/v1/chat/completions", b'{"model": "nobody/knows", "messages": []}'),
    ("/v1/responses", b'{"model": "%s", "input": 5}'),
    ("/v1/chat/completions", b'{"model": "%s", "messages": "hello"}'),
)


@attrs.define
class Tally:
    completed: int = 0
    cut_by_client: int = 0
    rejected: int = 0
    failed_retryable: int = 0
    failed_other: int = 0
    lost: int = 0
    latencies: list[float] = attrs.field(factory=list)
    examples: dict[str, str] = attrs.field(factory=dict)
    server_errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    kinds: collections.Counter[str] = attrs.field(factory=collections.Counter)
    late_completed: int = 0

    def note(self, bucket: str, detail: str) -> None:
        self.examples.setdefault(bucket, detail[:300])


@attrs.frozen
class SoakResult:
    requests: int
    concurrency: int
    completed: int
    cut_by_client: int
    rejected: int
    failed_retryable: int
    failed_other: int
    lost: int
    server_errors: dict[str, int]
    undocumented_5xx: int
    late_completed: int
    kinds: dict[str, int]
    p50_ms: float
    p99_ms: float
    seconds: float
    rss_start_mb: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    examples: dict[str, str]

    @property
    def rss_growth(self) -> float:
        """Growth from the warmed-up gateway to the end (a fresh process still fills caches,
        pools and lazily imported modules during its first requests)."""
        return (self.rss_end_mb - self.rss_after_warmup_mb) / self.rss_after_warmup_mb

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "rss_growth": round(self.rss_growth, 4)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _neuron_toml(name: str, registry_url: str, cache: Path) -> str:
    return f"""
name = "{name}"
default_source = "huggingface"

[sources.huggingface]
endpoint = "{registry_url}"
auth_env = "CORTEX_SOAK_NO_TOKEN"
cache_dir = "{cache}"

[[default_models]]
id = "{MODEL}"

[devices."cpu"]
memory_mb = 1024
max_queue = 256
"""


def _gateway_toml(neurons: dict[str, str]) -> str:
    lines = ['models_config = "models.toml"', ""]
    lines += ["[gateway]", "poll_interval = 0.5", "down_after_failures = 2", "retry_after = 1", ""]
    for name, url in neurons.items():
        lines += ["[[neurons]]", f'name = "{name}"', f'endpoint = "{url}"', ""]
    return "\n".join(lines)


class Fleet:
    """The registry, two neuron processes and a gateway process under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos = root / "repos"
        for repo in ("acme/soak-echo", "acme/soak-late"):
            publish_repo(
                self.repos, repo, {"echo.json": json.dumps({"reply": None, "memory_mb": 10})}
            )
        self.registry: ProcessServer | None = None
        self.registry_url = ""
        self.neurons: dict[str, ProcessServer] = {}
        self.gateway: ProcessServer | None = None
        # Built-ins (the echo harness) and the huggingface source: no torch to import.
        self.env = {
            "CORTEX_SOAK_NO_TOKEN": "",
            "CUDA_VISIBLE_DEVICES": "",
            "CORTEX_PLUGINS": "source-huggingface",
        }

    def _registry_argv(self, listen: str) -> list[str]:
        return python_program(
            "cortex.cli", "cortex", "registry", "serve", str(self.repos), "--listen", listen,
            "--log-level", "warning",
        )  # fmt: skip

    def _neuron_argv(self, name: str, listen: str) -> list[str]:
        path = self.root / f"{name}.toml"
        path.write_text(_neuron_toml(name, self.registry_url, self.root / f"cache-{name}"))
        return python_program(
            "cortex.cli", "neuron", "run", "-c", str(path), "--listen", listen,
            "--drain-seconds", "1", "--log-level", "warning",
        )  # fmt: skip

    def start(self) -> None:
        self.registry = ProcessServer(self._registry_argv("127.0.0.1:0"), env=self.env).start()
        self.registry_url = self.registry.url or ""
        for name in ("a", "b"):
            server = ProcessServer(self._neuron_argv(name, "127.0.0.1:0"), env=self.env)
            self.neurons[name] = server.start()
        for name in self.neurons:
            self.wait_ready(name)
        (self.root / "models.toml").write_text(f'[[models]]\nid = "{LATE}"\nmemory_mb = 10\n')
        config = self.root / "cortex.toml"
        config.write_text(_gateway_toml({n: s.url or "" for n, s in self.neurons.items()}))
        self.gateway = ProcessServer(
            python_program(
                "cortex.cli", "cortex", "serve", "-c", str(config), "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--log-level", "warning",
            ),
            env=self.env,
        ).start()  # fmt: skip

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        import httpx

        url = self.neurons[name].url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"{url}/models", timeout=5).json()["models"]
                if any(m["id"] == MODEL and m["state"] == "ready" for m in models):
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"neuron {name} did not load {MODEL}")

    @staticmethod
    def _again(argv: Callable[[str], list[str]], listen: str, env: dict[str, str]) -> ProcessServer:
        for _attempt in range(50):
            try:
                return ProcessServer(argv(listen), env=env).start()
            except RuntimeError:  # the port is not free yet
                time.sleep(0.1)
        raise RuntimeError(f"could not start again on {listen}")

    def restart(self, name: str) -> None:
        """SIGKILL the neuron, then start it again on the same port (it reloads the model)."""
        old = self.neurons[name]
        assert old.url is not None
        old.kill()
        listen = old.url.removeprefix("http://")
        self.neurons[name] = self._again(lambda at: self._neuron_argv(name, at), listen, self.env)
        self.wait_ready(name)

    def registry_down(self) -> None:
        assert self.registry is not None
        self.registry.kill()

    def registry_up(self) -> None:
        listen = self.registry_url.removeprefix("http://")
        self.registry = self._again(self._registry_argv, listen, self.env)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate(10)
        for server in self.neurons.values():
            server.terminate(10)
        if self.registry is not None:
            self.registry.terminate(10)


def _request(kind: str, index: int, late: bool) -> tuple[str, bytes, bool]:
    """(route, body, streamed) for request ``index`` of ``kind``."""
    text = f"request {index} says hello"
    model = LATE if kind == "late" and late else MODEL
    if kind == "bad":
        route, template = BAD_INPUTS[(index // len(CYCLE)) % len(BAD_INPUTS)]
        return route, template.replace(b"%s", MODEL.encode()), False
    stream = kind.endswith("_stream") or kind.startswith("cut_")
    user = [{"role": "user", "content": text}]
    body: dict[str, Any]
    if kind.startswith(("chat", "late", "cut_chat")):
        route, body = "/v1/chat/completions", {"model": model, "messages": user}
    elif kind.startswith("completions"):
        route, body = "/v1/completions", {"model": model, "prompt": text}
    elif kind.startswith(("messages", "cut_messages")):
        route, body = "/v1/messages", {"model": model, "max_tokens": 64, "messages": user}
    else:
        route, body = "/v1/responses", {"model": model, "input": text}
    if stream:
        body["stream"] = True
    return route, json.dumps(body).encode(), stream


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    tally: Tally,
    record: bool,
    late: bool = False,
) -> None:
    kind = CYCLE[index % len(CYCLE)]
    if not record and kind in ("late", "bad"):
        kind = "chat"
    route, body, stream = _request(kind, index, late)
    started = time.monotonic()
    headers = {"content-type": "application/json"}
    try:
        async with session.post(f"{url}{route}", data=body, headers=headers) as resp:
            if kind.startswith("cut_") and resp.status == 200:
                await resp.content.readany()  # the first chunk, then the client leaves
                resp.close()
                bucket, detail = "cut_by_client", ""
            else:
                raw = await resp.read()
                bucket, detail = _classify(route, kind, resp.status, resp.headers, raw, stream)
                if resp.status >= 500 and record:
                    tally.server_errors[_code(route, raw)] += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        bucket, detail = "lost", f"{type(exc).__name__}: {exc}"
    if not record:
        return
    tally.kinds[kind] += 1
    if bucket == "completed":
        tally.latencies.append(time.monotonic() - started)
        if kind == "late" and late:
            tally.late_completed += 1
    setattr(tally, bucket, getattr(tally, bucket) + 1)
    if bucket not in ("completed", "cut_by_client", "rejected"):
        tally.note(bucket, f"{kind} {route}: {detail}")


def _code(route: str, raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return "not_an_envelope"
    if not isinstance(error, dict):
        return "not_an_envelope"
    return str(error.get("code") or error.get("type") or "unknown")


def _stream_error(route: str, text: str) -> str | None:
    """The error a finished stream ended with, if any (its code or type), else None."""
    for frame in text.split("\n\n"):
        for line in frame.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                data = json.loads(line.removeprefix("data: "))
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            error = data.get("error")
            if data.get("type") in ("error", "response.failed") or isinstance(error, dict):
                found = error if isinstance(error, dict) else data.get("response", {})
                return str(found.get("code") or found.get("type") or "error")
    return None


def _stream_complete(route: str, text: str) -> bool:
    if route == "/v1/messages":
        return "event: message_stop" in text
    if route == "/v1/responses":
        return "response.completed" in text
    return text.rstrip().endswith("data: [DONE]")


def _whole_ok(route: str, data: Any) -> bool:
    if route == "/v1/messages":
        return data.get("type") == "message" and bool(data["content"][0]["text"])
    if route == "/v1/responses":
        return data.get("status") == "completed" and bool(data.get("output"))
    if route == "/v1/completions":
        return bool(data["choices"][0]["text"])
    return bool(data["choices"][0]["message"]["content"])


def _classify(
    route: str, kind: str, status: int, headers: Any, raw: bytes, stream: bool
) -> tuple[str, str]:
    text = raw.decode(errors="replace")
    if kind == "bad":
        if 400 <= status < 500:
            data = json.loads(raw)
            envelope = isinstance(data.get("error"), dict) and data["error"].get("message")
            return ("rejected", "") if envelope else ("failed_other", f"{status} {text}")
        return "failed_other", f"bad input answered {status}: {text[:200]}"
    if status == 200 and not stream:
        if _whole_ok(route, json.loads(raw)):
            return "completed", ""
        return "lost", f"an empty answer: {text}"
    if status == 200:
        error = _stream_error(route, text)
        if error is None and _stream_complete(route, text):
            return "completed", ""
        if error is not None:
            return "failed_retryable", f"stream ended with {error}: {text[-200:]}"
        return "lost", f"a stream that just stopped: {text[-200:]}"
    error = json.loads(raw).get("error")
    if not isinstance(error, dict):
        return "lost", f"{status} without an envelope: {text}"
    if status in RETRYABLE and headers.get("Retry-After"):
        return "failed_retryable", f"{status} {text}"
    return "failed_other", f"{status} {text}"


async def _drive(
    session: aiohttp.ClientSession,
    url: str,
    requests: int,
    concurrency: int,
    tally: Tally,
    events: dict[float, Callable[[], None]] | None = None,
    record: bool = True,
) -> None:
    """``requests`` requests, ``concurrency`` at a time; each event runs (in a thread) when the
    request at its fraction of the run starts. Requests for ``soak-late`` go out once the first
    event (the registry going down) has started."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    at = {int(requests * fraction): event for fraction, event in (events or {}).items()}
    first = min(at) if at else requests
    running: list[asyncio.Task[None]] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            event = at.pop(i, None)
            if event is not None:
                running.append(asyncio.create_task(asyncio.to_thread(event)))
            await _one(session, url, i, tally, record=record, late=i >= first)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    for task in running:
        await task


def run_soak(requests: int = 1000, concurrency: int = 64, warmup: int = 300) -> SoakResult:
    """Start the fleet, run the mixed soak with its faults, stop everything."""
    with tempfile.TemporaryDirectory(prefix="cortex-soak-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            fleet.start()
            assert fleet.gateway is not None and fleet.gateway.proc is not None
            pid, url = fleet.gateway.proc.pid, fleet.gateway.url or ""
            rss_start = rss_mb(pid)
            tally = Tally()
            rss_warm: list[float] = []
            events = {
                0.35: fleet.registry_down,
                0.50: lambda: fleet.restart("b"),
                0.65: fleet.registry_up,
            }
            started = time.monotonic()

            async def main() -> None:
                connector = aiohttp.TCPConnector(limit=concurrency)
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                    # Not counted: a fresh gateway fills its pools and caches first.
                    await _drive(session, url, warmup, concurrency, tally, record=False)
                    rss_warm.append(rss_mb(pid))
                    await _drive(session, url, requests, concurrency, tally, events)

            asyncio.run(main())
            seconds = time.monotonic() - started
            rss_end = rss_mb(pid)
        finally:
            fleet.stop()
    latencies = sorted(tally.latencies) or [0.0]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    server_errors = dict(sorted(tally.server_errors.items()))
    return SoakResult(
        requests=requests,
        concurrency=concurrency,
        completed=tally.completed,
        cut_by_client=tally.cut_by_client,
        rejected=tally.rejected,
        failed_retryable=tally.failed_retryable,
        failed_other=tally.failed_other,
        lost=tally.lost,
        server_errors=server_errors,
        undocumented_5xx=sum(n for c, n in server_errors.items() if c not in DOCUMENTED_5XX),
        late_completed=tally.late_completed,
        kinds=dict(sorted(tally.kinds.items())),
        p50_ms=round(statistics.median(latencies) * 1000, 2),
        p99_ms=round(p99 * 1000, 2),
        seconds=round(seconds, 1),
        rss_start_mb=round(rss_start, 1),
        rss_after_warmup_mb=round(rss_warm[0], 1),
        rss_end_mb=round(rss_end, 1),
        examples=tally.examples,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    args = parser.parse_args(argv)
    result = run_soak(args.requests, args.concurrency, args.warmup)
    print(json.dumps(result.to_json(), indent=2))
    ok = (
        result.lost == 0
        and result.failed_other == 0
        and result.undocumented_5xx == 0
        and result.rss_growth < 0.10
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
