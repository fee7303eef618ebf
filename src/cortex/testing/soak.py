"""A bounded soak on loopback: many requests through a real gateway across two echo neurons,
one of which is killed and restarted in the middle.

Everything is real: an HF-compatible registry serves the echo model, ``neuron run`` and
``cortex serve`` run as processes (so the gateway's RSS is its own), and the client speaks HTTP
with one aiohttp session. Every request ends in exactly one bucket:

- ``completed``: a 200 with a whole answer (a stream that reached ``[DONE]``);
- ``failed_retryable``: an error the gateway said can be retried (429/502/503/504 with
  ``Retry-After``, or an error chunk at the end of a stream cut by the restart);
- ``failed_other``: any other error in an envelope (must be 0 here);
- ``lost``: no answer and no error (a reset connection, a malformed body, a stream that just
  stops, a timeout) -- must be 0: the point of the gateway is to always say what happened.

Run: ``python -m cortex.testing.soak --requests 10000 --concurrency 64`` (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from cortex.testing.registry import publish_repo, start_registry
from cortex.testing.servers import ProcessServer, python_program

MODEL = "huggingface:acme/soak-echo"
RETRYABLE = {429, 502, 503, 504}


@attrs.define
class Tally:
    completed: int = 0
    failed_retryable: int = 0
    failed_other: int = 0
    lost: int = 0
    latencies: list[float] = attrs.field(factory=list)
    examples: dict[str, str] = attrs.field(factory=dict)

    def note(self, bucket: str, detail: str) -> None:
        self.examples.setdefault(bucket, detail[:300])


@attrs.frozen
class SoakResult:
    requests: int
    concurrency: int
    completed: int
    failed_retryable: int
    failed_other: int
    lost: int
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
    lines = ["[gateway]", "poll_interval = 0.5", "down_after_failures = 2", "retry_after = 1", ""]
    for name, url in neurons.items():
        lines += ["[[neurons]]", f'name = "{name}"', f'endpoint = "{url}"', ""]
    return "\n".join(lines)


class Fleet:
    """The registry, two neuron processes and a gateway process under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        repos = root / "repos"
        publish_repo(
            repos,
            "acme/soak-echo",
            {"echo.json": json.dumps({"reply": None, "memory_mb": 10}).encode()},
        )
        self.registry = start_registry(repos)
        self.neurons: dict[str, ProcessServer] = {}
        self.gateway: ProcessServer | None = None
        self.env = {"CORTEX_SOAK_NO_TOKEN": "", "CUDA_VISIBLE_DEVICES": ""}

    def _neuron_argv(self, name: str, listen: str) -> list[str]:
        path = self.root / f"{name}.toml"
        path.write_text(_neuron_toml(name, self.registry.url, self.root / f"cache-{name}"))
        return python_program(
            "cortex.cli", "neuron", "run", "-c", str(path), "--listen", listen,
            "--drain-seconds", "1", "--log-level", "warning",
        )  # fmt: skip

    def start(self) -> None:
        for name in ("a", "b"):
            server = ProcessServer(self._neuron_argv(name, "127.0.0.1:0"), env=self.env)
            self.neurons[name] = server.start()
        for name in self.neurons:
            self.wait_ready(name)
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

    def restart(self, name: str) -> None:
        """SIGKILL the neuron, then start it again on the same port (it reloads the model)."""
        old = self.neurons[name]
        assert old.url is not None
        listen = old.url.removeprefix("http://")
        old.kill()
        for _attempt in range(50):
            try:
                self.neurons[name] = ProcessServer(
                    self._neuron_argv(name, listen), env=self.env
                ).start()
                break
            except RuntimeError:  # the port is not free yet
                time.sleep(0.1)
        self.wait_ready(name)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate(10)
        for server in self.neurons.values():
            server.terminate(10)
        self.registry.stop()


async def _one(
    session: aiohttp.ClientSession, url: str, index: int, tally: Tally, record: bool
) -> None:
    stream = index % 4 == 0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {index} says hello"}],
        "stream": stream,
    }
    started = time.monotonic()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            bucket, detail = _classify(resp.status, resp.headers, raw, stream)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        bucket, detail = "lost", f"{type(exc).__name__}: {exc}"
    if not record:
        return
    if bucket == "completed":
        tally.latencies.append(time.monotonic() - started)
    setattr(tally, bucket, getattr(tally, bucket) + 1)
    if bucket != "completed":
        tally.note(bucket, detail)


def _classify(status: int, headers: Any, raw: bytes, stream: bool) -> tuple[str, str]:
    text = raw.decode(errors="replace")
    if status == 200 and not stream:
        data = json.loads(raw)
        if data["choices"][0]["message"]["content"]:
            return "completed", ""
        return "lost", f"an empty answer: {text}"
    if status == 200:
        frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f.startswith("data: ")]
        if frames and frames[-1] == "[DONE]" and '"error"' not in text:
            return "completed", ""
        errors = [f for f in frames if f.startswith("{") and "error" in json.loads(f)]
        if errors:
            code = json.loads(errors[-1])["error"].get("code", "")
            retryable = code.startswith("upstream") or code in ("device_poisoned", "queue_full")
            return ("failed_retryable" if retryable else "failed_other"), errors[-1]
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
    on_half: Any = None,
    record: bool = True,
) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    half = requests // 2
    restart: asyncio.Task[None] | None = None

    async def worker() -> None:
        nonlocal restart
        while not queue.empty():
            i = queue.get_nowait()
            if i == half and restart is None and on_half is not None:
                restart = asyncio.create_task(asyncio.to_thread(on_half))
            await _one(session, url, i, tally, record=record)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if restart is not None:
        await restart


def run_soak(requests: int = 1000, concurrency: int = 64, warmup: int = 300) -> SoakResult:
    """Start the fleet, run the soak with a neuron restart half way, stop everything."""
    with tempfile.TemporaryDirectory(prefix="cortex-soak-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            fleet.start()
            assert fleet.gateway is not None and fleet.gateway.proc is not None
            pid, url = fleet.gateway.proc.pid, fleet.gateway.url or ""
            rss_start = rss_mb(pid)
            tally = Tally()
            rss_warm: list[float] = []

            def restart_b() -> None:
                fleet.restart("b")

            started = time.monotonic()

            async def main() -> None:
                connector = aiohttp.TCPConnector(limit=concurrency)
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                    # Not counted: a fresh gateway fills its pools and caches first.
                    await _drive(session, url, warmup, concurrency, tally, record=False)
                    rss_warm.append(rss_mb(pid))
                    await _drive(session, url, requests, concurrency, tally, restart_b)

            asyncio.run(main())
            seconds = time.monotonic() - started
            rss_end = rss_mb(pid)
        finally:
            fleet.stop()
    latencies = sorted(tally.latencies) or [0.0]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return SoakResult(
        requests=requests,
        concurrency=concurrency,
        completed=tally.completed,
        failed_retryable=tally.failed_retryable,
        failed_other=tally.failed_other,
        lost=tally.lost,
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
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    args = parser.parse_args(argv)
    result = run_soak(args.requests, args.concurrency, args.warmup)
    print(json.dumps(result.to_json(), indent=2))
    ok = result.lost == 0 and result.failed_other == 0 and result.rss_growth < 0.10
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
